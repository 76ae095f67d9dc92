"""Shared fixtures: one tiny checkpoint per session, and a clean environment for every test."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Before torch loads MKL: MKL's matrix-vector kernels round differently depending on where in memory the
# weights start, and diffusers' loader leaves them at other alignments than ours. Reproducible mode makes
# the result depend on the values alone, so that "bit-identical to plain diffusers" tests the maths, not
# the allocator. (No effect on GPUs.)
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest
import torch

from zimage_turbo.checkpoints import make_checkpoint

# Variables that would change what the library does; tests must not inherit them from the developer.
_ISOLATED_PREFIXES = ("ZIMAGE_", "HF_", "MODELSCOPE_", "TORCHINDUCTOR_")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(_ISOLATED_PREFIXES):
            monkeypatch.delenv(name)
    # No stray .env, and caches that point nowhere real unless a test says otherwise.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """conftest.py files hold fixtures, not doctests: collected by --doctest-modules, each would be imported
    again as a module named ``conftest``, and the second would clash with the first."""
    return True if collection_path.name == "conftest.py" else None


@pytest.fixture
def hubs_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hubs' host names resolve, for tests that stand in for a hub's client (this machine may have no name
    service, and the library then fails a download before asking the client: zimage_turbo.hub_reach)."""
    import zimage_turbo.hub_snapshots
    import zimage_turbo.sources

    for module in (zimage_turbo.sources, zimage_turbo.hub_snapshots):
        monkeypatch.setattr(module, "unreachable", lambda hub: "")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight checkpoint, built once. Tests must not modify it (copy it first)."""
    return make_checkpoint("tiny", tmp_path_factory.mktemp("checkpoints") / "tiny")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests marked `quant` are about the quant extra; `make test-min-versions` runs them again in a pass of
    # their own, on that extra's floors. Without torchao the library refuses quantization before loading (a
    # test checks that), so those that quantize skip; quant(needs_torchao=False) marks those that run anyway.
    if importlib.util.find_spec("torchao") is None:
        no_torchao = pytest.mark.skip(reason="needs torchao: pip install 'zimage-turbo[quant]'")
        for item in items:
            marker = item.get_closest_marker("quant")
            if marker is not None and marker.kwargs.get("needs_torchao", True):
                item.add_marker(no_torchao)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    # A multi-GPU report made on the GPU machine can be checked anywhere (no GPU is touched then).
    report = os.environ.get("ZIMAGE_TEST_MULTI_GPU_JSON")
    for item in items:
        if report and item.path.name == "test_multi_gpu.py":
            continue
        if "gpu" in item.keywords:
            item.add_marker(skip)
