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
    assert "Requires-Dist: modelscope>=1.39; extra == 'modelscope'" in metadata
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
    """ci/min-versions.txt pins the floors of the package and of every extra but quant (the first pass of
    `make test-min-versions`), ci/min-versions-quant.txt those of the quant extra, which raises torch's."""
    extras = project()["optional-dependencies"]
    user_extras = set(extras) - {"dev", "docs"}  # the two that only developers install
    base = project()["dependencies"] + [line for extra in sorted(user_extras - {"quant"}) for line in extras[extra]]
    assert "quant" in user_extras
    assert _pins("min-versions.txt") == _lower_bounds(base)
    assert _pins("min-versions-quant.txt") == _lower_bounds(extras["quant"])
    # where a floor is raised for those who install the quant extra, it is raised, not lowered
    for name, bound in _lower_bounds(extras["quant"]).items():
        assert bound >= _lower_bounds(base).get(name, bound), name


def test_the_dev_extra_installs_the_user_extras_at_their_floors() -> None:
    """The dev extra repeats the packages of the user extras (the suite tests them); with the same floors."""
    extras = project()["optional-dependencies"]
    dev = _lower_bounds(extras["dev"])
    for extra in set(extras) - {"dev", "docs"}:
        for name, bound in _lower_bounds(extras[extra]).items():
            if name != "torch":  # the quant extra's torch floor is left out of dev on purpose (pyproject.toml)
                assert dev.get(name) == bound, f"{extra}: {name}"


def _lower_bounds(lines: list[str]) -> dict[str, Version]:
    """Each requirement's ``>=`` bound, by canonical name; a name bounded twice must agree with itself."""
    bounds: dict[str, Version] = {}
    for req in map(Requirement, lines):
        for spec in req.specifier:
            if spec.operator == ">=":
                bound = Version(spec.version)
                assert bounds.setdefault(_canonical(req.name), bound) == bound, req.name
    return bounds


def _pins(file: str) -> dict[str, Version]:
    pinned: dict[str, Version] = {}
    for line in (ROOT / "ci" / file).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pin = line.partition("==")
            assert _canonical(name) not in pinned, name
            pinned[_canonical(name)] = Version(pin.strip())
    return pinned


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
