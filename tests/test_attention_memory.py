"""The automatic attention kernel is measured once on a machine, not once per process: the choice is kept in the
cache folder under a key of everything it depends on. A "CUDA" device here is a stand-in (the name, the
availability check and the measuring are replaced), so what is tested is the bookkeeping; the GPU suite times
the kernels themselves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from zimage_turbo.speedups import attention

CUDA = torch.device("cuda", 0)
SHAPE = attention.AttentionShape(1, 4224, 30, 128)


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A stand-in GPU on which ``cudnn`` measures fastest; yields the log of measurements."""
    measured: list[str] = []

    def measure(device: torch.device, dtype: torch.dtype, shape: attention.AttentionShape, names: tuple[str, ...]):
        measured.append(f"{shape.tokens}")
        return {name: (0.001 if name == "cudnn" else 0.002) for name in names}

    monkeypatch.setattr(attention, "measure_attention", measure)
    monkeypatch.setattr(attention, "attention_available", lambda name, device: "")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    monkeypatch.setattr(attention, "_choices", {})  # a fresh process
    yield measured


def new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "_choices", {})


def test_a_later_process_uses_the_kernel_measured_by_an_earlier_one(
    gpu: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, seconds = attention.choose_attention(CUDA, torch.bfloat16, SHAPE, tmp_path)
    assert name == "cudnn" and seconds and gpu == ["4224"]
    new_process(monkeypatch)
    assert attention.choose_attention(CUDA, torch.bfloat16, SHAPE, tmp_path) == ("cudnn", {})
    assert gpu == ["4224"]  # not measured again
    # another shape, dtype or card is measured on its own, beside the first
    attention.choose_attention(CUDA, torch.bfloat16, attention.AttentionShape(1, 1152, 30, 128), tmp_path)
    attention.choose_attention(CUDA, torch.float16, SHAPE, tmp_path)
    assert gpu == ["4224", "1152", "4224"]
    assert len(attention._remembered(tmp_path)) == 3


def test_without_a_cache_folder_each_process_measures(gpu: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    attention.choose_attention(CUDA, torch.bfloat16, SHAPE)
    new_process(monkeypatch)
    attention.choose_attention(CUDA, torch.bfloat16, SHAPE)
    assert gpu == ["4224", "4224"]


def test_new_libraries_or_a_kernel_that_can_no_longer_run_mean_measuring_again(
    gpu: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attention.choose_attention(CUDA, torch.bfloat16, SHAPE, tmp_path)
    new_process(monkeypatch)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 92000)  # cuDNN upgraded
    attention.choose_attention(CUDA, torch.bfloat16, SHAPE, tmp_path)
    assert len(gpu) == 2
    new_process(monkeypatch)
    monkeypatch.setattr(attention, "attention_available", lambda name, device: "gone" if name == "cudnn" else "")
    name, _ = attention.choose_attention(CUDA, torch.bfloat16, SHAPE, tmp_path)
    assert len(gpu) == 3 and name == "cudnn"  # the stand-in measurer still calls it fastest; it was measured


@pytest.mark.parametrize("content", ["{not json", '["cudnn"]', '{"key": 3}'])
def test_a_damaged_file_is_measured_over_and_written_anew(
    gpu: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str
) -> None:
    (tmp_path / attention._CHOICES_FILE).write_text(content, encoding="utf-8")
    assert attention.choose_attention(CUDA, torch.bfloat16, SHAPE, tmp_path)[0] == "cudnn"
    assert gpu == ["4224"]
    new_process(monkeypatch)
    attention.choose_attention(CUDA, torch.bfloat16, SHAPE, tmp_path)
    assert gpu == ["4224"]  # the rewritten file is read


def test_a_remembered_name_that_is_not_an_automatic_kernel_is_not_trusted(
    gpu: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attention.choose_attention(CUDA, torch.bfloat16, SHAPE, tmp_path)
    [key] = attention._remembered(tmp_path)
    (tmp_path / attention._CHOICES_FILE).write_text(f'{{"{key}": "sage"}}', encoding="utf-8")  # lossy: never auto
    new_process(monkeypatch)
    assert attention.choose_attention(CUDA, torch.bfloat16, SHAPE, tmp_path)[0] == "cudnn"
    assert len(gpu) == 2


def test_a_cache_folder_that_cannot_be_written_still_gives_a_choice(gpu: list[str], tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("", encoding="utf-8")  # a file where the folder should be
    assert attention.choose_attention(CUDA, torch.bfloat16, SHAPE, blocked / "cache")[0] == "cudnn"
