"""The installed distributions' package map kept between processes (zimage_turbo.package_map): the kept answer is
Python's own, it is read again when a distribution is installed, changed or removed and when the file is damaged,
and environments whose distributions may come from elsewhere keep nothing."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import zimage_turbo
from zimage_turbo.package_map import environment_fingerprint, kept_packages_distributions, package_map_file
from zimage_turbo.quiet_imports import quiet_imports


class Scans:
    """importlib.metadata.packages_distributions, counted."""

    def __init__(self) -> None:
        self.count = 0
        self.real = importlib.metadata.packages_distributions

    def __call__(self) -> Any:
        self.count += 1
        return self.real()


def _install(site: Path, name: str, top_level: str) -> Path:
    """A minimal installed distribution in ``site``: its metadata entry and one module."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "RECORD").write_text(f"{top_level}/__init__.py,,\n{info.name}/METADATA,,\n")
    (site / top_level).mkdir()
    (site / top_level / "__init__.py").write_text("")
    return info


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_the_kept_map_is_pythons_own_and_a_second_ask_reads_no_distribution(tmp_path: Path, site: Path) -> None:
    _install(site, "zt-probe-one", "zt_probe_one")
    kept = tmp_path / "cache" / "package-map.json"
    scans = Scans()
    first = kept_packages_distributions(kept, scans)
    assert scans.count == 1 and kept.is_file()
    again = kept_packages_distributions(kept, scans)
    assert scans.count == 1  # from the file
    assert again == first == importlib.metadata.packages_distributions()
    assert again["zt_probe_one"] == ["zt-probe-one"]


def test_installing_changing_or_removing_a_distribution_reads_them_again(tmp_path: Path, site: Path) -> None:
    kept = tmp_path / "package-map.json"
    scans = Scans()
    kept_packages_distributions(kept, scans)
    info = _install(site, "zt-probe-two", "zt_probe_two")  # installed
    assert kept_packages_distributions(kept, scans)["zt_probe_two"] == ["zt-probe-two"]
    assert scans.count == 2
    # upgraded in place: its metadata entry is rewritten (a later modification time)
    (info / "RECORD").write_text("zt_probe_two/__init__.py,,\nzt_probe_two/extra.py,,\n")
    later = info.stat().st_mtime_ns + 10**9
    os.utime(info, ns=(later, later))
    kept_packages_distributions(kept, scans)
    assert scans.count == 3
    for item in sorted(info.iterdir()):  # removed
        item.unlink()
    info.rmdir()
    assert "zt_probe_two" not in kept_packages_distributions(kept, scans)
    assert scans.count == 4
    kept_packages_distributions(kept, scans)
    assert scans.count == 4  # and kept again for the environment as it is now


@pytest.mark.parametrize(
    "damage",
    [
        "{not json",
        json.dumps({"fingerprint": None, "map": {}}),
        "FINGERPRINT:[1, 2]",
        'FINGERPRINT:{"PIL": "pillow"}',
        'FINGERPRINT:{"PIL": [3]}',
    ],
)
def test_a_damaged_or_foreign_file_is_read_again_and_replaced(tmp_path: Path, damage: str) -> None:
    kept = tmp_path / "package-map.json"
    fingerprint = environment_fingerprint()
    assert fingerprint is not None
    if damage.startswith("FINGERPRINT:"):
        damage = json.dumps({"fingerprint": fingerprint, "map": json.loads(damage.removeprefix("FINGERPRINT:"))})
    kept.write_text(damage)
    scans = Scans()
    assert kept_packages_distributions(kept, scans) == importlib.metadata.packages_distributions()
    assert scans.count == 1
    assert json.loads(kept.read_text())["fingerprint"] == fingerprint  # replaced with a sound one
    kept_packages_distributions(kept, scans)
    assert scans.count == 1


def test_an_environment_with_its_own_distribution_finder_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Finder:
        @staticmethod
        def find_spec(*_: object) -> None:
            return None

        @staticmethod
        def find_distributions(*_: object) -> list[Any]:
            return []

    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, Finder])
    assert environment_fingerprint() is None
    kept = tmp_path / "package-map.json"
    scans = Scans()
    kept_packages_distributions(kept, scans)
    kept_packages_distributions(kept, scans)
    assert scans.count == 2 and not kept.exists()


def test_the_importlib_metadata_backports_finder_is_part_of_the_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Importing the backport (as notebooks' libraries do) adds a finder that reads the same folders: the map is
    still kept, under another fingerprint."""
    backport = pytest.importorskip("importlib_metadata")
    finder = backport.MetadataPathFinder
    monkeypatch.setattr(sys, "meta_path", [each for each in sys.meta_path if each is not finder])
    without = environment_fingerprint()
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, finder])
    with_it = environment_fingerprint()
    assert without is not None and with_it is not None and without != with_it
    kept = tmp_path / "package-map.json"
    scans = Scans()
    assert kept_packages_distributions(kept, scans) == importlib.metadata.packages_distributions()
    kept_packages_distributions(kept, scans)
    assert scans.count == 1


def test_an_unwritable_cache_still_answers(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    scans = Scans()
    answer = kept_packages_distributions(blocker / "package-map.json", scans)  # its folder is a file
    assert answer == importlib.metadata.packages_distributions() and scans.count == 1


def test_a_window_opened_with_the_file_answers_both_libraries_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = package_map_file(tmp_path)
    assert kept == tmp_path / "package-map.json"
    scans = Scans()
    monkeypatch.setattr(importlib.metadata, "packages_distributions", scans)
    for _ in range(2):  # two loads (two processes' worth): one scan
        with quiet_imports(package_map=kept):
            first = importlib.metadata.packages_distributions()
            assert importlib.metadata.packages_distributions() == first
    assert scans.count == 1
    with quiet_imports():  # a window without the file scans, as before
        importlib.metadata.packages_distributions()
    assert scans.count == 2


def test_a_later_process_takes_the_map_an_earlier_one_kept(tmp_path: Path) -> None:
    """The fingerprint is the same in another process of this environment: there a window opened with the file
    reads no distribution. (test_quiet_imports.py's first test checks that a load, in a fresh process, keeps it.)"""
    kept = package_map_file(tmp_path)
    script = f"""
        import importlib.metadata
        from pathlib import Path
        from zimage_turbo.package_map import environment_fingerprint
        from zimage_turbo.quiet_imports import quiet_imports
        real = importlib.metadata.packages_distributions
        scans = []
        def counted():
            scans.append(1)
            return real()
        importlib.metadata.packages_distributions = counted
        with quiet_imports(package_map=Path({str(kept)!r})):
            answer = importlib.metadata.packages_distributions()
        print("SCANS", len(scans), answer == real(), environment_fingerprint())
    """
    env = dict(os.environ)
    parent = str(Path(zimage_turbo.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([parent, *filter(None, [env.get("PYTHONPATH")])])
    said = []
    for _ in range(2):  # the first process scans and keeps the map, the second takes it
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        said.append(done.stdout.split())
    assert [words[:3] for words in said] == [["SCANS", "1", "True"], ["SCANS", "0", "True"]], said
