"""The converted copy: written once from a float32-stored source, read by later loads with the same images bit for
bit; stale, truncated or tampered copies are found and made again with the source untouched; no room, no copy."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_turbo import Generator, NotEnoughDiskSpaceError, ZImageSettings, make_checkpoint
from zimage_turbo import converted as converted_module
from zimage_turbo.converted import MANIFEST, copy_folder, find_copy, worth_converting, write_copy
from zimage_turbo.safetensors_header import read_safetensors_header
from zimage_turbo.sources import resolve_model
from zimage_turbo.weights import read_tensors

SIZE = {"height": 256, "width": 256, "steps": 1, "seed": 4}


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint laid out like the published one: a float32 transformer in shards."""
    return make_checkpoint("tiny", tmp_path_factory.mktemp("published") / "tiny", published_layout=True)


@pytest.fixture
def settings(published: Path, tmp_path: Path) -> ZImageSettings:
    # bfloat16 on the CPU: the source stores float32, so a copy in the run dtype reads half the bytes
    return ZImageSettings(model=str(published), cache_dir=tmp_path / "cache", dtype="bfloat16", progress=False)


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def first_load(settings: ZImageSettings, *, generate: bool = False) -> tuple[np.ndarray | None, Path]:
    """Load from the source (and generate once) and wait for the copy the Generator writes in the background."""
    with Generator(settings=settings, strategy="cpu") as gen:
        image = None
        if generate:
            image = np.asarray(gen.generate("a lighthouse", **SIZE).image)
        else:
            gen.load()
        assert gen.model is not None and gen.model.source == "local"
        assert gen._conversion is not None
        gen._conversion.join(timeout=120)
    model = resolve_model(settings)
    return image, copy_folder(model, torch.bfloat16, settings)


def load_image(settings: ZImageSettings) -> tuple[np.ndarray, str]:
    with Generator(settings=settings, strategy="cpu") as gen:
        image = np.asarray(gen.generate("a lighthouse", **SIZE).image)
        assert gen.model is not None
        return image, gen.model.source


@pytest.fixture
def source_untouched(published: Path) -> Iterator[None]:
    before = digests(published)
    yield
    assert digests(published) == before


def test_the_copy_is_written_once_and_gives_the_same_image(
    settings: ZImageSettings, published: Path, source_untouched: None
) -> None:
    model = resolve_model(settings)
    assert worth_converting(model, torch.bfloat16) and not worth_converting(model, torch.float32)
    image, folder = first_load(settings, generate=True)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["source"]["files"]
    # each component in one file, every floating tensor in bf16, equal to the source cast as loading casts it
    source_entries = {e.name: e for p in model.layout.weight_paths("transformer") for e in read_safetensors_header(p)}
    [copied] = read_safetensors_header(folder / "transformer" / "diffusion_pytorch_model.safetensors")[:1]
    assert copied.dtype == torch.bfloat16
    ours, theirs = (
        read_tensors([copied], torch.bfloat16)[0],
        read_tensors([source_entries[copied.name]], torch.bfloat16)[0],
    )
    assert torch.equal(ours, theirs)
    again, source = load_image(settings)
    assert source == "converted" and np.array_equal(again, image)
    copy_bytes = sum(p.stat().st_size for p in (folder / "transformer").glob("*.safetensors"))
    source_bytes = sum(p.stat().st_size for p in (published / "transformer").glob("*.safetensors"))
    assert copy_bytes < 0.55 * source_bytes  # half the bytes to read: bf16 instead of float32
    with Generator(settings=settings, strategy="cpu") as gen:
        gen.load()
        assert gen._conversion is None  # loaded from the copy: nothing more to write


@pytest.mark.parametrize("damage", ["truncated", "tampered", "manifest"])
def test_a_damaged_copy_is_found_and_made_again(settings: ZImageSettings, source_untouched: None, damage: str) -> None:
    _, folder = first_load(settings)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "tampered":  # same size, other bytes: found by the SHA-256 (the file's time changed)
        data = bytearray(weights.read_bytes())
        data[-50:] = bytes(50)
        weights.write_bytes(bytes(data))
    else:
        (folder / MANIFEST).write_text("{")
    assert find_copy(resolve_model(settings), torch.bfloat16, settings) is None
    assert not folder.exists()  # removed: the next load reads the source and writes a new one
    _, made = first_load(settings)
    assert made == folder and (made / MANIFEST).is_file()
    assert find_copy(resolve_model(settings), torch.bfloat16, settings) is not None


def test_a_changed_source_makes_the_copy_stale(published: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    import shutil

    shutil.copytree(published, source)
    settings = ZImageSettings(model=str(source), cache_dir=tmp_path / "cache", dtype="bfloat16", progress=False)
    _, old = first_load(settings)
    shard = sorted((source / "transformer").glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # a new version, say
    assert find_copy(resolve_model(settings), torch.bfloat16, settings) is None
    _, new = first_load(settings)
    assert new != old and new.is_dir() and not old.exists()  # the older source's copy is removed


def test_no_room_no_copy_and_nothing_written(
    settings: ZImageSettings, monkeypatch: pytest.MonkeyPatch, source_untouched: None
) -> None:
    monkeypatch.setattr(converted_module, "free_disk_bytes", lambda folder: 10 * 2**20)
    model = resolve_model(settings)
    with pytest.raises(NotEnoughDiskSpaceError, match="nothing was written") as caught:
        write_copy(model, torch.bfloat16, settings)
    assert caught.value.needed_bytes > 0
    root = copy_folder(model, torch.bfloat16, settings).parent
    assert not root.exists() or not any(root.iterdir())
    # a Generator still loads; the copy is just not made (a warning says why)
    _, made = first_load(settings)
    assert not made.exists()


def test_off_and_same_dtype_write_nothing(published: Path, tmp_path: Path) -> None:
    for dtype, mode in (("bfloat16", "off"), ("float32", "auto")):
        settings = ZImageSettings(
            model=str(published), cache_dir=tmp_path / "cache", dtype=dtype, progress=False, converted_copy=mode
        )
        with Generator(settings=settings, strategy="cpu") as gen:
            gen.load()
            assert gen._conversion is None
    assert not (tmp_path / "cache" / "converted").exists()


def test_abandoned_temporary_folders_are_removed(settings: ZImageSettings) -> None:
    model = resolve_model(settings)
    folder = copy_folder(model, torch.bfloat16, settings)
    folder.parent.mkdir(parents=True)
    dead = folder.parent / f".{folder.name}.writing-999999999-1"  # no such process
    dead.mkdir()
    (dead / "half.safetensors").write_bytes(b"x" * 1000)
    write_copy(model, torch.bfloat16, settings)
    assert not dead.exists() and folder.is_dir()


def test_cli_convert(settings: ZImageSettings, published: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from zimage_turbo.cli import main

    argv = ["convert", "--model", str(published), "--cache-dir", str(settings.cache_dir), "-q"]
    assert main(argv) == 0
    assert "Wrote the converted copy" in capsys.readouterr().out
    assert main(argv) == 0
    assert "A sound converted copy exists" in capsys.readouterr().out


def test_a_load_from_the_copy_reads_no_more_bytes_than_the_weights_own_size(
    settings: ZImageSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 22's "reading the converted copy moves no more bytes than the weights' own size": every tensor read
    once, in the run dtype (from the float32 source, the transformer's bytes are read twice over)."""
    from zimage_turbo import weights

    first_load(settings)
    read: list[int] = []
    pread = weights._pread_into

    def counted(fd: int, view: memoryview, position: int) -> int:
        got = pread(fd, view, position)
        read.append(got)
        return got

    monkeypatch.setattr(weights, "_pread_into", counted)

    def load(chosen: ZImageSettings, source: str) -> tuple[int, int]:
        """Bytes read from weight files by a load, and the bytes of the weights it loaded."""
        read.clear()
        with Generator(settings=chosen, strategy="cpu") as gen:
            gen.load()
            assert gen.model is not None and gen.model.source == source
            storages = {
                tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
                for name in ("transformer", "text_encoder", "vae")
                for tensor in getattr(gen.pipeline, name).state_dict(keep_vars=True).values()
            }
            return sum(read), sum(storages.values())

    from_copy, weights_size = load(settings, "converted")
    assert 0 < from_copy <= weights_size
    from_source, same_size = load(settings.model_copy(update={"converted_copy": "off"}), "local")
    assert same_size == weights_size and from_source > 1.5 * from_copy  # float32 transformer: twice its bytes
