"""What people who install or pin the package get: the license in the wheel and the sdist, a version that
says what is unreleased, dependency bounds that hold, and the lowest versions written down for a test run."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import zimage_turbo

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def project() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as stream:
        table: dict[str, Any] = tomllib.load(stream)["project"]
    return table


def test_wheel_and_sdist_ship_the_license(tmp_path: Path) -> None:
    pytest.importorskip("hatchling", reason="the dev extra installs hatchling")
    # The PEP 517 hooks, in-process in a child (they read the working folder): no network, about a second.
    script = (
        "import sys; from hatchling.build import build_sdist, build_wheel; "
        "print(build_wheel(sys.argv[1])); print(build_sdist(sys.argv[1]))"
    )
    built = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert built.returncode == 0, built.stderr
    wheel_name, sdist_name = built.stdout.split()
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0" in license_text
    with zipfile.ZipFile(tmp_path / wheel_name) as wheel:
        dist_info = f"zimage_turbo-{zimage_turbo.__version__}.dist-info"
        assert wheel.read(f"{dist_info}/licenses/LICENSE").decode() == license_text
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert "Requires-Dist: modelscope>=1.30; extra == 'modelscope'" in metadata
    with tarfile.open(tmp_path / sdist_name) as sdist:
        member = sdist.extractfile(f"zimage_turbo-{zimage_turbo.__version__}/LICENSE")
        assert member is not None and member.read().decode() == license_text


def test_unreleased_work_is_a_dev_release_of_the_next_version() -> None:
    current = Version(zimage_turbo.__version__)
    released = [Version(v) for v in re.findall(r"^## \[(\d[^\]]*)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)]
    assert current.is_devrelease
    assert current > max(released) and current.base_version not in {str(v) for v in released}


def test_modelscope_is_an_extra() -> None:
    table = project()
    names = {Requirement(line).name for line in table["dependencies"]}
    assert "modelscope" not in names
    assert [Requirement(line).name for line in table["optional-dependencies"]["modelscope"]] == ["modelscope"]


def test_diffusers_is_bounded_and_the_installed_one_is_inside() -> None:
    [diffusers] = [Requirement(line) for line in project()["dependencies"] if line.startswith("diffusers")]
    assert any(spec.operator == "<" for spec in diffusers.specifier)  # we use its private hooks
    assert diffusers.specifier.contains(version("diffusers"), prereleases=True)


def test_min_versions_pin_every_declared_lower_bound() -> None:
    table = project()
    declared = [Requirement(line) for line in table["dependencies"]]
    for extra in ("modelscope", "quant", "ray", "bench"):
        declared += [Requirement(line) for line in table["optional-dependencies"][extra]]
    lower = {_canonical(req.name): spec.version for req in declared for spec in req.specifier if spec.operator == ">="}
    pinned = {}
    for line in (ROOT / "ci" / "min-versions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pin = line.partition("==")
            pinned[_canonical(name)] = pin.strip()
    assert set(pinned) == set(lower)
    for name, bound in lower.items():
        assert Version(pinned[name]) == Version(bound), name


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
