"""The soak on a real GPU: benchmarks/soak.py's 200 generations in one process, full-size checkpoint, mixed
sizes and strategy switches. Set ZIMAGE_TEST_SOAK_JSON to a report of that script to check it instead of
running it again (about 4.5 minutes on an H200).

What "no leak" means here, precisely:

* GPU: after each generation, ``torch.cuda.memory_allocated()`` is within 64 MiB of the median of all the
  generations that ran under the same strategy (its resident weights), in every block of that strategy.
* Host: warm-up ends once every strategy of the schedule has had one full block (first visits allocate the
  pinned homes that later visits reuse; ``warmup_generations`` in the report). After it, the RSS measured after
  ``malloc_trim(0)`` never rises more than 256 MiB above its value at the end of the warm-up, and its
  least-squares slope is below 1 MiB per generation; pinned host memory rises by at most one 1 GiB buffer.
* Threads and open files: flat after the warm-up (up to 2 threads and 8 files of slack).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
# Read at import: the autouse fixture in tests/conftest.py clears ZIMAGE_* variables for each test.
_SOAK_JSON = os.environ.get("ZIMAGE_TEST_SOAK_JSON")
ALLOCATED_TOLERANCE = 64 * MIB
RSS_RISE_LIMIT = 256 * MIB
RSS_SLOPE_LIMIT = 1 * MIB  # per generation
PINNED_RISE_LIMIT = 1024 * MIB


@pytest.fixture(scope="module")
def report(full_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if _SOAK_JSON and Path(_SOAK_JSON).is_file():
        return json.loads(Path(_SOAK_JSON).read_text())  # type: ignore[no-any-return]
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--checkpoint", str(full_checkpoint)]
    subprocess.run([*command, "--out", str(out), "--no-plot"], check=True, timeout=1200)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def _after_warmup(report: dict[str, Any], key: str) -> list[Any]:
    return [r[key] for r in report["records"][report["warmup_generations"] :]]


def _slope(values: list[float]) -> float:
    count = len(values)
    mean_x, mean_y = (count - 1) / 2, sum(values) / count
    numerator = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    return numerator / sum((x - mean_x) ** 2 for x in range(count))


def test_every_generation_ran_as_scheduled(report: dict[str, Any]) -> None:
    records = report["records"]
    assert len(records) == report["generations"] >= 200
    assert report["environment"]["device"] == "cuda"
    for record in records:
        assert record["strategy"] == record["requested"] and record["fallbacks"] == [], record
        assert record["image_size"] == [record["width"], record["height"]]
    assert len({r["strategy"] for r in records}) >= 4 and len({(r["width"], r["height"]) for r in records}) >= 4
    assert 0 < report["warmup_generations"] <= len(records) - 100  # at least 100 generations after it


def test_allocated_memory_returns_to_the_same_level_after_each_generation(report: dict[str, Any]) -> None:
    for strategy in {r["strategy"] for r in report["records"]}:
        values = [r["allocated_bytes"] for r in report["records"] if r["strategy"] == strategy]
        level = statistics.median(values)
        worst = max(values, key=lambda v: abs(v - level))
        assert abs(worst - level) <= ALLOCATED_TOLERANCE, (strategy, level / MIB, worst / MIB)


def test_host_rss_is_flat_after_the_warm_up(report: dict[str, Any]) -> None:
    rss = _after_warmup(report, "rss_trimmed_bytes")
    assert max(rss) - rss[0] <= RSS_RISE_LIMIT, ((max(rss) - rss[0]) / MIB, "MiB above the end of the warm-up")
    assert _slope(rss) < RSS_SLOPE_LIMIT, (_slope(rss) / MIB, "MiB per generation")


def test_pinned_host_memory_is_reused_after_the_warm_up(report: dict[str, Any]) -> None:
    pinned = _after_warmup(report, "pinned_host_bytes")
    if any(value is None for value in pinned):
        pytest.skip("this torch does not report pinned host memory (torch.cuda.host_memory_stats)")
    assert max(pinned) - pinned[0] <= PINNED_RISE_LIMIT, (max(pinned) - pinned[0]) / MIB


def test_threads_and_open_files_are_flat_after_the_warm_up(report: dict[str, Any]) -> None:
    threads = _after_warmup(report, "threads")
    assert max(threads) - threads[0] <= 2
    files = _after_warmup(report, "open_files")
    if all(value is not None for value in files):
        assert max(files) - files[0] <= 8
