"""The docs promise what the code does: every setting is documented where users look."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zimage_turbo.settings import ENV_PREFIX, ZImageSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("document", ["README.md", "docs/configuration.md"])
def test_every_setting_is_in_the_configuration_tables(document: str) -> None:
    text = (ROOT / document).read_text(encoding="utf-8")
    for field in ZImageSettings.model_fields:
        assert f"`{field}`" in text, f"{document} does not document {field}"
        assert f"`{ENV_PREFIX}{field.upper()}`" in text, f"{document} lacks {ENV_PREFIX}{field.upper()}"


def test_changelog_has_this_version() -> None:
    from zimage_turbo import __version__

    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    release, dev, _ = __version__.partition(".dev")
    if dev:  # unreleased work: its version is not released yet, and the changelog gathers it under Unreleased
        assert "## [Unreleased]" in changelog and f"## [{release}]" not in changelog
    else:
        assert f"## [{__version__}]" in changelog


def test_benchmark_numbers_in_the_docs_have_their_json() -> None:
    names = set()
    for document in ("README.md", "docs/benchmarks.md"):
        names |= set(re.findall(r"benchmarks/results/([\w.-]+\.(?:json|png))", (ROOT / document).read_text()))
    assert names
    for name in names:
        assert (ROOT / "benchmarks" / "results" / name).is_file(), name


def test_the_api_reference_shows_the_whole_public_api_once() -> None:
    import zimage_turbo

    shown = []
    for page in sorted((ROOT / "docs" / "reference").glob("*.md")):
        shown += re.findall(r"^::: zimage_turbo\.(\w+)$", page.read_text(encoding="utf-8"), re.MULTILINE)
    assert len(shown) == len(set(shown)), "a name is on two pages"
    assert set(shown) == set(zimage_turbo.__all__) - {"__version__"}
