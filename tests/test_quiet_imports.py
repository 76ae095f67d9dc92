"""A first generation prints nothing of the model libraries' own import noise, and the program's own use of
those loggers is left as it was. (``import zimage_turbo`` alone imports none of them and prints nothing.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import zimage_turbo

PACKAGE_PARENT = str(Path(zimage_turbo.__file__).resolve().parents[1])
# What every process printed before (with torchao installed, as the dev extra has it).
NOISE = ("Unable to import `torchao` Tensor objects", "Failed to load", "Enum subclass", "_pytree")


def run(script: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_PARENT, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=300
    )


# With or without torchao: the noise came from it, so this runs again on the quant extra's floors.
@pytest.mark.quant(needs_torchao=False)
def test_a_tiny_generation_prints_none_of_the_import_noise(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Also: its load's imports scan the installed distributions once and keep the map for the next process
    (package_map.py; test_package_map.py checks that a later process takes it)."""
    done = run(
        f"""
        import importlib.metadata
        import logging
        from pathlib import Path
        from zimage_turbo import Generator, ZImageSettings

        real, scans = importlib.metadata.packages_distributions, []
        def counted():
            scans.append(1)
            return real()
        importlib.metadata.packages_distributions = counted
        settings = ZImageSettings(
            model={str(tiny_checkpoint)!r}, source="local", progress=False, cache_dir=Path({str(tmp_path)!r})
        )
        Generator(settings=settings).generate("a fox", width=256, height=256, steps=1, seed=0)
        logging.getLogger("torchao").warning("the program's own message")
        print([logging.getLogger(name).level for name in ("torchao", "torch.utils._pytree")], len(scans))
        """
    )
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stderr.splitlines() if any(noise in line for noise in NOISE)], done.stderr
    assert "the program's own message" in done.stderr  # levels put back: nothing hidden for good
    assert done.stdout.strip() == "[0, 0] 1"
    assert json.loads((tmp_path / "package-map.json").read_text())["map"]


def test_the_libraries_imports_scan_the_installed_distributions_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers and transformers each ask importlib.metadata.packages_distributions() while imported (1.6 s each
    on the H200 machine's environment): inside the window the first answer serves both."""
    import importlib.metadata

    from zimage_turbo.quiet_imports import quiet_imports

    scans: list[int] = []

    def scan() -> dict[str, list[str]]:
        scans.append(1)
        return {"PIL": ["pillow"], "yaml": ["PyYAML"]}

    monkeypatch.setattr(importlib.metadata, "packages_distributions", scan)
    with quiet_imports():
        kept = importlib.metadata.packages_distributions  # as a module that imports the name would
        first = importlib.metadata.packages_distributions()
        first["PIL"].append("changed by its caller")
        with quiet_imports():  # nested: the same window
            second = importlib.metadata.packages_distributions()
    assert scans == [1] and second == {"PIL": ["pillow"], "yaml": ["PyYAML"]}
    assert importlib.metadata.packages_distributions is scan  # put back
    assert kept() == {"PIL": ["pillow"], "yaml": ["PyYAML"]} and len(scans) == 2  # past the window: a scan again
    with quiet_imports():
        importlib.metadata.packages_distributions()
        importlib.metadata.packages_distributions()
    assert len(scans) == 3  # a later window scans again, once
