"""benchmarks/soak.py on the tiny checkpoint and the CPU: its bookkeeping (which strategy, size and seed each
generation had, where it switched, what it measured). Timings are recorded, never asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_default_run_is_planned_to_fit_in_about_four_minutes_on_an_h200(soak: ModuleType) -> None:
    runs = soak.plan_run(200, 25, soak.SCHEDULE, soak.SIZES)
    assert len(runs) == 200 and len({r["seed"] for r in runs}) == 200
    assert {r["requested"] for r in runs} == {"full_gpu", "hybrid", "streamed", "model_offload"}
    seconds = soak.expected_seconds([r["requested"] for r in runs], [(r["width"], r["height"]) for r in runs], 8)
    assert 180 <= seconds <= 300
    # every strategy has had a full block by generation 100; the last 100 revisit them
    assert soak.warmup_generations(runs, 25) == 100


def test_soak_runs_and_records_every_generation(soak: ModuleType, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--device", "cpu", "--generations", "6"]
    argv += ["--switch-every", "2", "--schedule", "full_gpu", "hybrid", "model_offload"]
    argv += ["--sizes", "256x256", "320x256", "--steps", "1"]
    assert soak.main(argv) == 0
    report = json.loads(out.read_text())
    records = report["records"]
    assert [r["index"] for r in records] == list(range(6))
    expected = ["full_gpu"] * 2 + ["hybrid"] * 2 + ["model_offload"] * 2
    assert [r["requested"] for r in records] == expected
    assert [r["strategy"] for r in records] == expected and all(r["fallbacks"] == [] for r in records)
    assert [(r["width"], r["height"]) for r in records] == [(256, 256), (320, 256)] * 3
    assert all(r["image_size"] == [r["width"], r["height"]] for r in records)
    assert [r["seed"] for r in records] == list(range(1000, 1006))
    assert [r["switch_seconds"] is not None for r in records] == [False, False, True, False, True, False]
    for record in records:
        assert record["allocated_bytes"] == 0 and record["reserved_bytes"] == 0  # no GPU here
        assert record["rss_bytes"] > 0 and record["rss_trimmed_bytes"] > 0 and record["seconds"] > 0
        assert record["threads"] >= 1
        assert record["host_homes_bytes"] == 0  # on the CPU, weights are their own homes: nothing pinned
    assert report["warmup_generations"] == 6 and report["environment"]["device"] == "cpu"
    per_strategy = report["summary"]["per_strategy"]
    assert {name: s["generations"] for name, s in per_strategy.items()} == dict.fromkeys(expected, 2)
    assert all(s["allocated_max_deviation_mib"] == 0 for s in per_strategy.values())
    plot = tmp_path / "soak.png"
    assert report["plot"] == (plot.name if plot.exists() else None)
