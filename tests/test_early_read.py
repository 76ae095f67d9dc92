"""Weights read while the libraries are imported (zimage_turbo.early_read): the same values as reading them into
the built module, only for components headed for a device (not host homes), and a failed read raised where the
component is taken, with nothing left behind."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import zimage_turbo.early_read as early_read
import zimage_turbo.weights as weights
from zimage_turbo import IncompleteModelError, check_pipeline_dir
from zimage_turbo.early_read import EarlyReads, reads_early
from zimage_turbo.host import HostHomes
from zimage_turbo.loader import load_pipeline
from zimage_turbo.weights import read_entries, read_safetensors_header

CPU = torch.device("cpu")


def _entries(checkpoint: Path, component: str) -> list[Any]:
    return [
        entry
        for path in sorted((checkpoint / component).glob("*.safetensors"))
        for entry in read_safetensors_header(path)
    ]


def _load(checkpoint: Path, targets: dict[str, Any]) -> Any:
    layout = check_pipeline_dir(checkpoint)
    return load_pipeline(layout, dtype=torch.float32, targets=targets, homes=HostHomes(pin=False), progress=False)


def test_only_components_headed_for_the_cpu_or_a_cuda_gpu_are_read_ahead() -> None:
    assert reads_early(CPU) == CPU and reads_early("cpu") == CPU
    assert reads_early(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert reads_early("homes") is None  # pinned homes are reserved as each module is filled
    assert reads_early(torch.device("mps")) is None and reads_early("meta") is None
    with pytest.raises(ValueError, match="CPU or a CUDA device"):
        read_entries([], torch.float32, torch.device("meta"))


def test_a_load_reads_the_cpu_components_ahead_and_gives_the_same_pipeline(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_on: list[tuple[str, str]] = []
    original = early_read.read_entries

    def spy(entries: Any, dtype: torch.dtype, device: torch.device) -> Any:
        read_on.append((threading.current_thread().name, entries[0].path.parent.name))
        return original(entries, dtype, device)

    files_read_by: list[str] = []  # which threads read files at all (the early thread, or the load's own)
    read_to_host = weights._read_to_host

    def counted(*args: Any, **kwargs: Any) -> Any:
        files_read_by.append(threading.current_thread().name)
        return read_to_host(*args, **kwargs)

    monkeypatch.setattr(early_read, "read_entries", spy)
    monkeypatch.setattr(weights, "_read_to_host", counted)
    ahead = _load(tiny_checkpoint, {"transformer": CPU, "text_encoder": CPU, "vae": CPU})
    assert read_on == [("zimage-turbo-early-read", name) for name in ("transformer", "text_encoder", "vae")]
    assert set(files_read_by) == {"zimage-turbo-early-read"}  # nothing read twice
    read_on.clear()
    files_read_by.clear()
    homes = _load(tiny_checkpoint, {"vae": CPU})  # the others go to their host homes: filled as before
    assert read_on == [("zimage-turbo-early-read", "vae")]
    assert files_read_by.count("MainThread") == 2
    for name in ("transformer", "text_encoder", "vae"):
        mine, reference = getattr(ahead, name).state_dict(), getattr(homes, name).state_dict()
        assert mine.keys() == reference.keys()
        assert all(torch.equal(mine[key], value) and mine[key].dtype == value.dtype for key, value in reference.items())
    # tied weights stay one parameter when read ahead too
    text_encoder = ahead.text_encoder
    if getattr(text_encoder.config, "tie_word_embeddings", False) and hasattr(text_encoder, "lm_head"):
        assert text_encoder.lm_head.weight is text_encoder.get_input_embeddings().weight


def test_a_failed_read_is_raised_where_the_component_is_taken_and_the_rest_is_not_read_ahead(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    transformer = _entries(tiny_checkpoint, "transformer")
    vae = _entries(tiny_checkpoint, "vae")
    victim = transformer[0].path
    cut = tmp_path / victim.name
    cut.write_bytes(victim.read_bytes()[: transformer[0].start + 8])  # its header whole, its data cut short
    broken = [dataclasses.replace(entry, path=cut) if entry.path == victim else entry for entry in transformer]
    reads = EarlyReads([("transformer", broken, CPU), ("vae", vae, CPU)], torch.float32)
    try:
        with pytest.raises(IncompleteModelError, match="ended while reading"):
            reads.take("transformer")
        assert reads.take("vae") is None  # left to the load, if it goes on
        assert reads.take("text_encoder") is None  # never asked for
    finally:
        reads.close()


def test_an_out_of_memory_read_fails_the_load_as_out_of_memory_and_leaves_nothing_behind(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[EarlyReads] = []
    original_init = EarlyReads.__init__

    def remember(self: EarlyReads, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        taken.append(self)

    def out_of_memory(entries: Any, dtype: torch.dtype, device: torch.device) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(EarlyReads, "__init__", remember)
    monkeypatch.setattr(early_read, "read_entries", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        _load(tiny_checkpoint, {"transformer": CPU, "text_encoder": CPU, "vae": CPU})
    [reads] = taken
    assert reads._thread is not None and not reads._thread.is_alive()  # joined before the error left the load
    assert reads._values == {} and reads._errors == {}


def test_values_not_taken_are_dropped_on_close(tiny_checkpoint: Path) -> None:
    reads = EarlyReads([("vae", _entries(tiny_checkpoint, "vae"), CPU)], torch.float32)
    reads.close()
    assert reads.take("vae") is None
