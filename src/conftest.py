"""The doctests of the package's docstrings (pytest's --doctest-modules, see pyproject.toml) run as the CPU
tests do: in a fresh folder (what an example writes lands there), without the developer's ZIMAGE_*, HF_* and
MODELSCOPE_* variables or .env file. This file is outside the package, so it is not installed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def clean_doctest_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("ZIMAGE_", "HF_", "MODELSCOPE_", "TORCHINDUCTOR_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """conftest.py files hold fixtures, not doctests: collected by --doctest-modules, each would be imported
    again as a module named ``conftest``, and the second would clash with the first."""
    return True if collection_path.name == "conftest.py" else None
