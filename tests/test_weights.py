"""Weights read straight from safetensors files into their modules (zimage_turbo.weights), against the libraries'
own from_pretrained, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from zimage_turbo import IncompleteModelError, ModelLoadError, check_pipeline_dir
from zimage_turbo.host import HostHomes, _Packer
from zimage_turbo.loader import load_pipeline
from zimage_turbo.weights import fill_module, read_safetensors_header


class Toy(torch.nn.Module):
    """Tied like transformers' language models: declared by name, stored once."""

    _tied_weights_keys = {"head.weight": "embed.weight"}  # noqa: RUF012

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(tie_word_embeddings=True)
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.norm = torch.nn.LayerNorm(4)
        self.register_buffer("scale", torch.tensor([2.0]))
        self.register_buffer("cache", torch.zeros(3), persistent=False)


def _empty_toy() -> Toy:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return Toy()


def _save(tensors: dict[str, torch.Tensor], path: Path) -> list:
    save_file(tensors, str(path))
    return read_safetensors_header(path)


def _stored(source: Toy) -> dict[str, torch.Tensor]:
    return {k: v for k, v in source.state_dict().items() if k != "head.weight"}


def test_fill_gives_every_tensor_its_stored_value_and_keeps_ties(tmp_path: Path) -> None:
    source = Toy()
    entries = _save(_stored(source), tmp_path / "toy.safetensors")
    module = _empty_toy()
    fill_module(module, entries, dtype=torch.float32, destination="cpu")
    for name, tensor in source.state_dict().items():
        assert torch.equal(module.state_dict()[name], tensor), name
    assert module.head.weight is module.embed.weight  # one parameter, not two copies
    assert not any(p.is_meta for p in module.parameters())
    assert module.cache.shape == (3,)  # unsaved buffer kept from the constructor


def test_fill_casts_floating_tensors_like_to(tmp_path: Path) -> None:
    source = Toy()
    entries = _save(_stored(source), tmp_path / "toy.safetensors")
    module = _empty_toy()
    fill_module(module, entries, dtype=torch.bfloat16, destination="cpu")
    assert module.embed.weight.dtype == torch.bfloat16
    assert torch.equal(module.embed.weight, source.embed.weight.to(torch.bfloat16))


def test_large_tensors_are_read_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zimage_turbo import weights

    monkeypatch.setattr(weights, "STAGING_CHUNK_BYTES", 24)  # every tensor of the toy spans several chunks
    source = Toy()
    entries = _save(_stored(source), tmp_path / "toy.safetensors")
    for dtype in (torch.float32, torch.bfloat16):
        module = _empty_toy()
        fill_module(module, entries, dtype=dtype, destination="cpu")
        assert torch.equal(module.embed.weight, source.embed.weight.to(dtype))
        assert torch.equal(module.norm.weight, source.norm.weight.to(dtype))


def test_into_unpinned_homes_every_tensor_has_its_home(tmp_path: Path) -> None:
    source = Toy()
    entries = _save(_stored(source), tmp_path / "toy.safetensors")
    module = _empty_toy()
    homes = HostHomes(pin=False)
    fill_module(module, entries, dtype=torch.float32, destination="homes", homes=homes)
    assert homes.has_home(module)


def test_mismatched_files_are_refused_naming_the_file_and_keys(tmp_path: Path) -> None:
    source = Toy()
    stored = _stored(source)
    missing = _save({k: v for k, v in stored.items() if k != "norm.bias"}, tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing\.safetensors.*norm\.bias"):
        fill_module(_empty_toy(), missing, dtype=torch.float32, destination="cpu")
    extra = _save({**stored, "surprise": torch.ones(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(ModelLoadError, match=r"unexpected.*surprise"):
        fill_module(_empty_toy(), extra, dtype=torch.float32, destination="cpu")
    reshaped = _save({**stored, "norm.weight": torch.ones(5)}, tmp_path / "shape.safetensors")
    with pytest.raises(ModelLoadError, match=r"shape\.safetensors.*norm\.weight.*\[5\]"):
        fill_module(_empty_toy(), reshaped, dtype=torch.float32, destination="cpu")


def test_truncated_or_lying_headers_are_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "toy.safetensors"
    save_file(_stored(Toy()), str(path))
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-10])
    with pytest.raises(IncompleteModelError, match="truncated"):
        read_safetensors_header(tmp_path / "short.safetensors")
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    header["norm.bias"]["shape"] = [400]
    text = json.dumps(header).encode()
    (tmp_path / "lying.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data[8 + header_length :])
    with pytest.raises(IncompleteModelError, match="needs 1600"):
        read_safetensors_header(tmp_path / "lying.safetensors")


def test_the_pipeline_equals_from_pretrained_bit_for_bit(tiny_checkpoint: Path) -> None:
    from diffusers import ZImagePipeline

    ours = load_pipeline(
        check_pipeline_dir(tiny_checkpoint), dtype=torch.float32, targets={}, homes=HostHomes(pin=False), progress=False
    )
    theirs = ZImagePipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    for name in ("transformer", "text_encoder", "vae"):
        mine, reference = getattr(ours, name), getattr(theirs, name)
        assert not mine.training
        ours_state, their_state = mine.state_dict(), reference.state_dict()
        assert ours_state.keys() == their_state.keys()
        for key, value in their_state.items():
            assert ours_state[key].dtype == value.dtype and torch.equal(ours_state[key], value), (name, key)
        for (key, buffer), (_, their_buffer) in zip(mine.named_buffers(), reference.named_buffers(), strict=True):
            assert torch.equal(buffer, their_buffer), (name, key)


def test_a_layout_of_the_pinned_homes_matches_the_real_packing() -> None:
    """reserve() lays out slots on the meta device first and allocates the buffers afterwards, in parallel;
    the layout must put every tensor where packing would."""
    specs = [((1000,), torch.float32), ((0,), torch.float32), ((3, 7), torch.bfloat16), ((5000,), torch.int64)]
    chunk = 16 * 1024
    pending = sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in specs)
    layout = _Packer(pin=False, pending_bytes=pending, chunk_bytes=chunk, device="meta")
    real = _Packer(pin=False, pending_bytes=pending, chunk_bytes=chunk)
    for shape, dtype in specs:
        layout.slot(shape, dtype)
        real.slot(shape, dtype)
    assert layout.placements == real.placements
    assert [b.numel() for b in layout.buffers] == [b.numel() for b in real.buffers]
    assert all(start % 256 == 0 for _, start in real.placements)
