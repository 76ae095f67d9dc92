"""Every strategy and the ladder on a real GPU, with the full-size checkpoint.

The cases are those of benchmarks/strategies.py (each in a fresh process, so that a memory cap set with
torch.cuda.set_per_process_memory_fraction applies to the whole process). Set ZIMAGE_TEST_STRATEGIES_JSON to
the report of a run of that script to check it instead of running the cases again. Timings are recorded in the
report, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
CAPS = [80, 24, 16, 12, 8, 6, 4]
WEIGHTS_GIB = 20.52e9 / 2**30
# Estimates must be within this fraction of the measured peak allocation.
ESTIMATE_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def report(
    full_checkpoint: Path, strategies_json: str | None, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    if strategies_json and Path(strategies_json).is_file():
        return json.loads(Path(strategies_json).read_text())  # type: ignore[no-any-return]
    out = tmp_path_factory.mktemp("strategies") / "strategies.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "strategies.py"), "--checkpoint", str(full_checkpoint)]
    subprocess.run([*command, "--out", str(out), "--images", "2"], check=True, timeout=1500)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def _rows(report: dict[str, Any], case: str) -> list[dict[str, Any]]:
    return [row for row in report["cases"] if row.get("case") == case]


def _within_estimate(row: dict[str, Any]) -> None:
    for device, measured in row["peak_gib"].items():
        predicted = row["predicted_gib"].get(device)
        if predicted is None or measured < 0.05:
            continue
        assert abs(predicted - measured) <= ESTIMATE_TOLERANCE * measured, (
            row["requested"],
            device,
            predicted,
            measured,
        )


def test_every_strategy_gives_the_full_gpu_image(report: dict[str, Any]) -> None:
    rows = _rows(report, "switch")
    assert {row.get("requested") for row in rows} >= {
        "full_gpu",
        "hybrid",
        "model_offload",
        "streamed",
        "sequential_offload",
    }
    for row in rows:
        assert "error" not in row, row
        assert row["strategy"] == row["requested"].split("+")[0] and row["fallbacks"] == []
        # Same weights, same kernels, same noise: identical in practice; allow rounding noise.
        assert row["difference_from_full_gpu"]["max_abs"] <= 2, row


def test_estimates_are_within_15_percent_of_measured_peaks(report: dict[str, Any]) -> None:
    for row in report["cases"]:
        if "error" not in row and not row["fallbacks"]:
            _within_estimate(row)


@pytest.mark.parametrize("cap", CAPS)
def test_auto_makes_an_image_under_every_cap(report: dict[str, Any], cap: int) -> None:
    [row] = [r for r in _rows(report, "cap") if r["requested"] == "auto" and r["cap_gib"] == cap]
    assert "error" not in row, row.get("error")
    assert (row["width"], row["height"]) == (1024, 1024)
    assert max(row["peak_gib"].values()) <= cap
    assert row["fallbacks"] == []  # the plan fitted: no out-of-memory error even had to be caught
    if "difference_from_full_gpu" in row:
        assert row["difference_from_full_gpu"]["max_abs"] <= 2 or row["vae_tiling"]


def test_forced_full_gpu_on_a_16_gib_card_falls_back(report: dict[str, Any]) -> None:
    [row] = [r for r in _rows(report, "cap") if r["requested"] == "full_gpu" and r["cap_gib"] == 16]
    assert "error" not in row, row.get("error")
    assert row["strategy"] != "full_gpu"
    assert any("full_gpu" in fallback for fallback in row["fallbacks"])
    assert max(row["peak_gib"].values()) <= 16


def test_forced_full_gpu_that_runs_out_while_decoding_tiles_the_decode(report: dict[str, Any]) -> None:
    [row] = [r for r in _rows(report, "cap") if r["requested"] == "full_gpu" and r["cap_gib"] == 21]
    assert "error" not in row, row.get("error")
    assert row["vae_tiling"] and any(fallback.startswith("vae_tiling") for fallback in row["fallbacks"])


def test_streaming_holds_one_copy_of_the_weights_in_host_memory(report: dict[str, Any]) -> None:
    for row in _rows(report, "cap"):
        if "error" not in row and row["strategy"] in ("streamed", "sequential_offload", "model_offload"):
            assert row["host_homes_gib"] <= 1.1 * WEIGHTS_GIB, row


def test_cuda_is_still_healthy() -> None:
    assert torch.cuda.is_available() and torch.ones(1, device="cuda").item() == 1
