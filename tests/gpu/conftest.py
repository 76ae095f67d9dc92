"""Fixtures of the GPU suite. The full-size checkpoint takes about 35 s to build on an H200; set
ZIMAGE_TEST_FULL_CHECKPOINT to a folder made by `zimage-turbo make-checkpoint full DIR` to reuse one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zimage_turbo import make_checkpoint

# Read at import: the autouse fixture in tests/conftest.py clears ZIMAGE_* variables for each test.
_FULL_CHECKPOINT = os.environ.get("ZIMAGE_TEST_FULL_CHECKPOINT")


@pytest.fixture(scope="session")
def full_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if _FULL_CHECKPOINT and Path(_FULL_CHECKPOINT, "model_index.json").is_file():
        return Path(_FULL_CHECKPOINT)
    return make_checkpoint("full", tmp_path_factory.mktemp("full") / "full", device="cuda")
