"""Two or more GPUs: the model split over cards capped at 12 GiB each, with no offloading to the host.

Runs benchmarks/strategies.py (reference image on one uncapped GPU, then ``auto`` with every GPU capped at
12 GiB, then ``multi_gpu`` uncapped). Set ZIMAGE_TEST_MULTI_GPU_JSON to a report of such a run to check it
instead. Skipped with fewer than two GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]

ROOT = Path(__file__).resolve().parents[2]
_REPORT = os.environ.get("ZIMAGE_TEST_MULTI_GPU_JSON")


@pytest.fixture(scope="module")
def report(full_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if _REPORT and Path(_REPORT).is_file():
        return json.loads(Path(_REPORT).read_text())  # type: ignore[no-any-return]
    out = tmp_path_factory.mktemp("multi") / "multi_gpu.json"
    script = str(ROOT / "benchmarks" / "strategies.py")
    arguments = ["--no-switch", "--caps", "12", "--forced", "multi_gpu@none", "--images", "2"]
    subprocess.run(
        [sys.executable, script, "--checkpoint", str(full_checkpoint), "--out", str(out), *arguments], check=True
    )
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def _row(report: dict[str, Any], requested: str, cap: float | None) -> dict[str, Any]:
    [row] = [r for r in report["cases"] if r.get("requested") == requested and r.get("cap_gib") == cap]
    assert "error" not in row, row.get("error")
    return row


def test_two_12_gib_cards_run_the_model_without_offload(report: dict[str, Any]) -> None:
    row = _row(report, "auto", 12)
    assert row["strategy"] == "multi_gpu" and row["fallbacks"] == []
    assert row["host_homes_gib"] < 0.5  # nothing lives on the host
    assert len([v for v in row["peak_gib"].values() if v > 1]) >= 2  # both cards hold part of the model
    assert all(v <= 12 for v in row["peak_gib"].values())
    assert row["difference_from_full_gpu"]["max_abs"] <= 2 or row["vae_tiling"]
    for device, measured in row["peak_gib"].items():
        if measured > 1:
            assert abs(row["predicted_gib"][device] - measured) <= 0.15 * measured


def test_uncapped_multi_gpu_matches_one_gpu(report: dict[str, Any]) -> None:
    row = _row(report, "multi_gpu", None)
    assert row["strategy"] == "multi_gpu"
    assert row["difference_from_full_gpu"]["max_abs"] <= 2
