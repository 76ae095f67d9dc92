"""The weight files are handed to the kernel's readahead before the libraries are imported, so that a start from
a cold page cache reads them while importing (benchmarks/cold_start.py --drop-caches measures it on a GPU)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from zimage_turbo import Generator, ZImageSettings, readahead
from zimage_turbo.layout import check_pipeline_dir

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this system")


@pytest.fixture
def advised(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """(inode, offset, length) of each WILLNEED advice given, in order."""
    given: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            given.append((os.fstat(fd).st_ino, offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    return given


def _files(tmp_path: Path, sizes: list[int]) -> list[Path]:
    paths = []
    for index, size in enumerate(sizes):
        path = tmp_path / f"part-{index}.safetensors"
        path.write_bytes(b"\0" * size)
        paths.append(path)
    return paths


def test_every_file_is_advised_whole_in_order_from_a_background_thread(
    tmp_path: Path, advised: list[tuple[int, int, int]]
) -> None:
    paths = _files(tmp_path, [4096, 100, 8192])
    thread = readahead.start_readahead(paths)
    assert thread is not None and thread.daemon
    thread.join(10)
    assert advised == [(path.stat().st_ino, 0, 0) for path in paths]


def test_files_that_would_not_fit_in_memory_are_not_advised(
    tmp_path: Path, advised: list[tuple[int, int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _files(tmp_path, [4096, 4096])
    free = SimpleNamespace(available=int(8192 / readahead.READAHEAD_MEMORY_SHARE) - 1)
    monkeypatch.setattr(readahead.psutil, "virtual_memory", lambda: free)
    assert readahead.start_readahead(paths) is None and advised == []
    free.available += 1
    thread = readahead.start_readahead(paths)
    assert thread is not None
    thread.join(10)
    assert len(advised) == 2
    # a missing file: nothing advised, the load reports it
    assert readahead.start_readahead([tmp_path / "gone.safetensors"]) is None


def test_loading_advises_the_model_weights_before_importing_the_libraries(
    tiny_checkpoint: Path, advised: list[tuple[int, int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import zimage_turbo.loader as loader

    order: list[str] = []
    start = readahead.start_readahead

    def started(paths: list[Path]) -> object:
        order.append("readahead")
        thread = start(paths)
        if thread is not None:
            thread.join(10)
        return thread

    real_quiet = loader.quiet_imports

    def imports() -> object:
        order.append("imports")
        return real_quiet()

    monkeypatch.setattr(loader, "start_readahead", started)
    monkeypatch.setattr(loader, "quiet_imports", imports)
    Generator(model=tiny_checkpoint, strategy="cpu", settings=ZImageSettings(progress=False)).load().close()
    layout = check_pipeline_dir(tiny_checkpoint)
    weights = [path for name in ("transformer", "text_encoder", "vae") for path in layout.weight_paths(name)]
    assert order[:2] == ["readahead", "imports"]
    assert [inode for inode, _, _ in advised] == [path.stat().st_ino for path in weights]
