"""Two to four GPUs: one model split over capped cards (every assignment the planner makes), streaming on each
card, a pool over every card, and a batch over a local Ray.

Runs benchmarks/multi_gpu.py (each case in a fresh process; about ten minutes on four H200s). Set
ZIMAGE_TEST_MULTI_GPU_JSON to a report of such a run to check it instead. Cases needing more GPUs than the
machine (or the report) has are skipped. Timing targets are quoted from the report, not asserted; speed-ups
of the pool and of Ray are ratios measured in the same run, and are.
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

pytestmark = [pytest.mark.gpu]

ROOT = Path(__file__).resolve().parents[2]
# Read at import: the autouse fixture in tests/conftest.py clears ZIMAGE_* variables for each test.
_REPORT = os.environ.get("ZIMAGE_TEST_MULTI_GPU_JSON")
# The same image as one uncapped GPU, within rounding; a tiled decode differs from an untiled one on average by
# about this much (it blends tiles where they meet).
SAME, SAME_TILED_MEAN = 2, 3


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if _REPORT and Path(_REPORT).is_file():
        return json.loads(Path(_REPORT).read_text())  # type: ignore[no-any-return]
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (or ZIMAGE_TEST_MULTI_GPU_JSON)")
    full = tmp_path_factory.getbasetemp() / "full"
    if not (full / "model_index.json").is_file():
        from zimage_turbo import make_checkpoint

        make_checkpoint("full", full, device="cuda")
    out = tmp_path_factory.mktemp("multi") / "multi_gpu.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--checkpoint", str(full), "--out", str(out)],
        check=True,
    )
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def gpus(report: dict[str, Any]) -> int:
    return len(report["environment"]["gpus"])


def case(report: dict[str, Any], name: str, needs: int = 2) -> dict[str, Any]:
    if gpus(report) < needs:
        pytest.skip(f"{name} needs {needs} GPUs")
    rows = [r for r in report["cases"] if r.get("case") == name]
    assert rows, f"{name} is missing from the report"
    assert "error" not in rows[0], rows[0].get("error")
    return rows[0]


def same_image(row: dict[str, Any]) -> None:
    """The image of one uncapped card; with a tiled decode, that of one card decoding in the same tiles (tiles
    blend where they meet: on two H200s up to 22 levels from the untiled decode, 1.5 on average)."""
    assert (row["width"], row["height"]) == (1024, 1024)
    if row["vae_tiling"]:
        assert row["difference_from_tiled_reference"]["max_abs"] <= SAME
        assert row["difference_from_reference"]["mean_abs"] <= SAME_TILED_MEAN
    else:
        assert row["difference_from_reference"]["max_abs"] <= SAME


def cards_used(row: dict[str, Any]) -> int:
    return len([v for v in row["peak_gib"].values() if v > 0.5])


def within_caps(row: dict[str, Any]) -> None:
    caps = row["caps_gib"]
    for device, peak in row["peak_gib"].items():
        cap = caps[int(device.split(":")[1])]
        assert cap is None or peak <= cap, (device, peak, cap)


# -- one model over several cards -----------------------------------------------------------------------------


def test_uncapped_split_puts_whole_components_on_different_cards(report: dict[str, Any]) -> None:
    row = case(report, "split_uncapped")
    assert row["strategy"] == "multi_gpu" and row["fallbacks"] == [] and row["host_homes_gib"] < 0.5
    placement = row["placement"]
    assert placement["main"] != placement["text_encoder"] and len(placement["transformer_blocks_per_card"]) == 1
    same_image(row)


@pytest.mark.parametrize(("name", "cards"), [("auto_2x12", 2), ("auto_3x8", 3), ("auto_4x6", 4)])
def test_auto_splits_the_model_over_capped_cards_with_nothing_offloaded(
    report: dict[str, Any], name: str, cards: int
) -> None:
    row = case(report, name, cards)
    assert row["strategy"] == "multi_gpu" and row["host_homes_gib"] < 0.5
    assert not [f for f in row["fallbacks"] if not f.startswith("vae_tiling")]  # at most a tiled decode retry
    assert len(row["placement"]["transformer_blocks_per_card"]) == cards  # blocks on every card
    assert cards_used(row) == cards
    within_caps(row)
    same_image(row)


def test_two_8_gib_cards_split_the_transformer_and_stream_the_text_encoder(report: dict[str, Any]) -> None:
    row = case(report, "auto_2x8")
    assert row["strategy"] == "multi_gpu_hybrid" and row["fallbacks"] == []
    assert row["placement"]["text_encoder_streamed"] and len(row["placement"]["transformer_blocks_per_card"]) == 2
    assert 6 < row["host_homes_gib"] < 10  # the text encoder's pinned copy, nothing else
    within_caps(row)
    same_image(row)


def test_cards_of_different_sizes(report: dict[str, Any]) -> None:
    row = case(report, "split_24_12")
    assert row["strategy"] == "multi_gpu" and row["fallbacks"] == []
    assert row["placement"]["main"] == "cuda:0" and row["placement"]["text_encoder"] == "cuda:1"
    within_caps(row)
    same_image(row)


def test_a_split_that_does_not_fit_climbs_the_ladder_on_the_same_weights(report: dict[str, Any]) -> None:
    row = case(report, "ladder_2x8")
    assert row["fallbacks"] and row["fallbacks"][0].startswith("strategy: multi_gpu")
    assert row["strategy"] != "multi_gpu"
    within_caps(row)
    same_image(row)


# -- streaming on each card -------------------------------------------------------------------------------------


def test_every_card_streams_the_same_image(report: dict[str, Any]) -> None:
    rows = [case(report, f"streamed_cuda{k}") for k in range(gpus(report))]
    for k, row in enumerate(rows):
        assert row["strategy"] == "streamed" and row["device"] == f"cuda:{k}", row["device"]
        same_image(row)
    # The speed of each card is quoted in docs/scaling.md from the report (a benchmark, not asserted here).


# -- throughput ---------------------------------------------------------------------------------------------------


def test_a_pool_over_every_card_scales_and_gives_one_replicas_images(report: dict[str, Any]) -> None:
    row = case(report, "pool")
    count = gpus(report)
    assert len(row["devices"]) == count and row["failures"] == []
    assert set(row["strategies"].values()) == {"full_gpu"}
    assert len(row["images_per_device"]) == count and all(n > 0 for n in row["images_per_device"].values())
    assert row["max_abs_difference_one_vs_all"] <= SAME  # an image does not depend on the card that made it
    assert row["speedup"] >= 0.9 * count, row["speedup"]  # 3.6x on four cards, 1.8x on two


def test_a_small_card_adds_to_the_pool_through_a_streamed_replica(report: dict[str, Any]) -> None:
    row = case(report, "pool_capped")
    one = case(report, "pool")["one_replica_images_per_s"]
    count = gpus(report)
    small = f"cuda:{count - 1}"
    assert row["failures"] == [] and small in row["devices"]
    assert row["strategies"][small] in ("streamed", "streamed+vae_tiling")
    assert row["images_per_device"].get(small, 0) > 0
    assert row["all_replicas_images_per_s"] > (count - 1) * one  # more than the big cards alone could make
    assert row["difference_from_reference"][small]["max_abs"] <= SAME  # a streamed replica draws the same image


def test_a_ray_batch_uses_every_card_and_resumes_to_the_same_images(report: dict[str, Any]) -> None:
    row = case(report, "ray", needs=1)
    count = gpus(report)
    assert row["whole_exit"] == 0 and row["actors"] == count and row["strategies"] == ["full_gpu"]
    assert 0 < row["killed_after_lines"] < row["prompts"] and row["killed_exit"] != 0
    assert row["resumed_exit"] == 0 and row["manifest_lines"] == row["prompts"] and row["manifest_ids_unique"]
    assert row["max_abs_difference_resumed_vs_whole"] <= SAME
    if count >= 2:
        one = case(report, "pool")["one_replica_images_per_s"]
        assert row["images_per_s"] >= 0.875 * count * one, (row["images_per_s"], one)  # 3.5x on four cards
