"""Streaming at block level: the weights outside the blocks move through their host homes, on the CPU.

diffusers moves a streamed module's non-block weights (for the text encoder, the token embedding) in a
group of their own, by synchronous copies from and into new pageable memory. ``stream()`` makes that group
copy from the homes and point the weights back at them. On the CPU a copy "to the device" is the home itself,
so these tests use homes whose ``send_to`` makes a fresh copy, as a copy to a GPU does: a weight is then at
its home after a call only if the offload pointed it back there.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from test_generator import plain_diffusers, same
from zimage_turbo import Generator, StreamedOffload, ZImageSettings
from zimage_turbo.host import HostHomes
from zimage_turbo.strategies.base import host_homes
from zimage_turbo.strategies.streaming import block_tensors, other_tensors, stream, unstream

PROMPT = "a red fox in fresh snow at dawn"
CPU = torch.device("cpu")


def _listed(what: torch.nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(what, torch.nn.Module):
        return [*what.parameters(), *what.buffers()]
    return list(what)


class DeviceLikeHomes(HostHomes):
    """Unpinned homes whose ``send_to`` leaves each tensor on a fresh copy, and that log what they moved."""

    def __init__(self) -> None:
        super().__init__(pin=False)
        self.moves: list[tuple[str, frozenset[int]]] = []

    def send_to(self, what: torch.nn.Module | Iterable[torch.Tensor], device: torch.device) -> None:
        tensors = _listed(what)
        self.moves.append(("to", frozenset(map(id, tensors))))
        super().send_to(tensors, device)
        for tensor in tensors:
            tensor.data = tensor.data.clone()

    def send_home(self, what: torch.nn.Module | Iterable[torch.Tensor]) -> None:
        tensors = _listed(what)
        self.moves.append(("home", frozenset(map(id, tensors))))
        super().send_home(tensors)


def at_home(homes: HostHomes, tensors: Iterable[torch.Tensor]) -> bool:
    """Every tensor has a home and its data is that very memory (no other host copy)."""
    return all(id(t) in homes._homes and t.data_ptr() == homes._homes[id(t)].data_ptr() for t in tensors)


@pytest.fixture
def text_encoder(tiny_checkpoint: Path) -> torch.nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(tiny_checkpoint / "text_encoder").eval()


@pytest.fixture
def input_ids(text_encoder: torch.nn.Module) -> torch.Tensor:
    return torch.randint(0, text_encoder.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))


def encode(module: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(input_ids=input_ids).last_hidden_state


def test_other_tensors_are_everything_outside_the_blocks_once(text_encoder: torch.nn.Module) -> None:
    others = other_tensors(text_encoder)
    assert any(t is text_encoder.embed_tokens.weight for t in others)
    assert len({id(t) for t in others}) == len(others)
    inside = {id(t) for t in block_tensors(text_encoder)}
    assert not inside & {id(t) for t in others}
    everything = {id(t) for t in (*text_encoder.parameters(), *text_encoder.buffers())}
    assert inside | {id(t) for t in others} == everything


def test_each_call_copies_the_non_block_weights_from_their_homes_and_points_them_back(
    text_encoder: torch.nn.Module, input_ids: torch.Tensor
) -> None:
    expected = encode(text_encoder, input_ids)
    homes = DeviceLikeHomes()
    stream(text_encoder, homes, CPU, level="block")
    others = other_tensors(text_encoder)
    ids = frozenset(map(id, others))
    assert at_home(homes, others)
    for call in range(1, 4):
        assert torch.equal(encode(text_encoder, input_ids), expected)
        # one copy to the device and one pointer swap home per call, nothing else through the homes
        assert homes.moves == [("to", ids), ("home", ids)] * call
        assert at_home(homes, others)
    unstream(text_encoder, homes)
    assert at_home(homes, [*text_encoder.parameters(), *text_encoder.buffers()])
    assert text_encoder._diffusers_hook.hooks == {}


def test_after_an_interrupted_call_unstream_sends_every_tensor_home(
    text_encoder: torch.nn.Module, input_ids: torch.Tensor
) -> None:
    homes = DeviceLikeHomes()
    stream(text_encoder, homes, CPU, level="block")

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    handle = text_encoder.layers[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        encode(text_encoder, input_ids)
    handle.remove()
    others = other_tensors(text_encoder)
    assert not at_home(homes, others)  # onloaded, never offloaded: on fresh copies
    unstream(text_encoder, homes)
    assert at_home(homes, [*text_encoder.parameters(), *text_encoder.buffers()])


def test_kept_resident_the_non_block_weights_do_not_go_through_the_homes(
    text_encoder: torch.nn.Module, input_ids: torch.Tensor
) -> None:
    homes = DeviceLikeHomes()
    stream(text_encoder, homes, CPU, level="block", keep_other_resident=True)
    encode(text_encoder, input_ids)
    assert homes.moves == []
    assert not homes.has_home(other_tensors(text_encoder))


def test_streamed_offload_images_stay_bit_identical_and_the_text_encoder_at_home(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [reference] = plain_diffusers(tiny_checkpoint, PROMPT, height=256, width=256, steps=2, seeds=[5])
    gen = Generator(
        model=tiny_checkpoint,
        strategy=StreamedOffload(device="cpu"),
        settings=ZImageSettings(progress=False),
        load=True,
    )
    homes = host_homes(gen.pipeline)
    others = other_tensors(gen.pipeline.text_encoder)
    ids = frozenset(map(id, others))
    sent: list[frozenset[int]] = []
    send_to = homes.send_to

    def recording_send_to(what: Any, device: torch.device) -> None:
        tensors = _listed(what)
        sent.append(frozenset(map(id, tensors)))
        send_to(tensors, device)

    monkeypatch.setattr(homes, "send_to", recording_send_to)
    images: list[Image.Image] = []
    for generation in range(1, 4):
        images.append(gen.generate(PROMPT, height=256, width=256, steps=2, seed=5).image)
        assert sent.count(ids) == generation  # the text encoder's non-block weights: once per prompt
        assert at_home(homes, others)
    assert all(same(image, reference) for image in images)
