"""``partial`` on a real GPU with the full-size checkpoint, under memory caps of 6, 8 and 12 GiB; this GPU's
measured speeds (run them on a CUDA machine: ``pytest -m gpu tests/gpu/test_gpu_partial.py``).

Each capped case runs in a fresh process, so that ``torch.cuda.set_per_process_memory_fraction`` applies to
everything it allocates. The images are compared with ``full_gpu``'s (same seed, uncapped, its own process):
within the tolerance the suite allows between placements that run the same kernels (max 12 levels, PSNR above
40 dB; in practice identical), and for fp8 the bound the suite uses for quantization. Timings are printed (the
benchmark, ``scripts/device_partial.sh bench``, records them), never asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from zimage_turbo import calibration

pytestmark = pytest.mark.gpu

PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"
SEED = 7
# Every placement of the same weights runs the same kernels; the suite's bound between them (kernels aside).
MAX_DIFFERENCE = 12
MIN_PSNR_DB = 40.0

_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    spec = json.loads(sys.argv[1])
    if spec["cap"] is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(spec["cap"] * 2**30 / total, 0)
    from zimage_turbo import Generator, PartialOffload, ZImageSettings
    from zimage_turbo.speedups.block_insides import insides_compiled
    strategy = spec["strategy"]
    if isinstance(strategy, list):
        strategy = PartialOffload(transformer_blocks=strategy[0], text_encoder_blocks=strategy[1])
    elif isinstance(strategy, dict):
        strategy = PartialOffload(**strategy)
    settings = {"progress": False, "attention": "native", "compile": "off", "cache_dir": spec["cache"]}
    settings.update(spec["settings"])
    gen = Generator(model=spec["model"], strategy=strategy, settings=ZImageSettings(**settings)).load()
    # what the allocator holds beyond our own weights once placed: the planner counts only the weights as ours
    held = gen._placement.held_bytes().get(0, 0)
    beyond = (torch.cuda.memory_allocated(0) - held) / 2**20
    placed = {"label": gen.strategy.label, "allocated_beyond_weights_mib": beyond}
    results = [
        gen.generate(spec["prompt"], height=1024, width=1024, seed=spec["seed"]) for _ in range(spec["images"])
    ]
    np.save(spec["out"], np.asarray(results[0].image))
    speeds = gen.hardware.gpus[0].speeds
    residency = getattr(gen.strategy, "residency", None)
    print("RESULT " + json.dumps({
        "strategy": results[-1].strategy,
        "label": gen.strategy.label,
        "residency": None if residency is None else [residency.transformer, residency.text_encoder],
        "fallbacks": [str(f) for r in results for f in r.fallbacks],
        "vae_tiling": results[-1].vae_tiling,
        "compiled": list(results[-1].compiled),
        "quantization": results[-1].quantization,
        "reserved_gib": torch.cuda.max_memory_reserved(0) / 2**30,
        "seconds": [r.timings.work for r in results],
        "speeds": None if speeds is None else speeds.to_dict(),
        "placed": placed,
        "insides_compiled": sum(1 for m in gen.pipeline.transformer.modules() if insides_compiled(m)),
    }))
    """
)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for every process of this module: the first measures this GPU, the others read it."""
    return tmp_path_factory.mktemp("cache")


def run(
    checkpoint: Path,
    cache: Path,
    out: Path,
    *,
    cap: float | None,
    strategy: str | list[int] | dict[str, int] = "partial",
    images: int = 1,
    **settings: str,
) -> tuple[dict[str, Any], np.ndarray]:
    spec = {
        "model": str(checkpoint),
        "cache": str(cache),
        "out": str(out),
        "cap": cap,
        "strategy": strategy,
        "images": images,
        "settings": settings,
        "prompt": PROMPT,
        "seed": SEED,
    }
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True, timeout=400)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    row: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"{strategy} @ {cap} GiB {settings}: {json.dumps(row)}")
    return row, np.load(out).astype(np.int16)


@pytest.fixture(scope="module")
def reference(full_checkpoint: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    row, image = run(full_checkpoint, cache, tmp_path_factory.mktemp("ref") / "full.npy", cap=None, strategy="full_gpu")
    assert row["strategy"] == "full_gpu" and row["fallbacks"] == []
    return image


def close(image: np.ndarray, reference: np.ndarray) -> bool:
    return int(np.abs(image - reference).max()) <= MAX_DIFFERENCE and _psnr(image, reference) > MIN_PSNR_DB


@pytest.mark.parametrize("cap", [12, 8, 6])
def test_partial_under_a_cap_gives_the_full_gpu_image(
    full_checkpoint: Path, cache: Path, reference: np.ndarray, tmp_path: Path, cap: int
) -> None:
    row, image = run(full_checkpoint, cache, tmp_path / "image.npy", cap=cap)
    assert row["strategy"] == "partial" and row["fallbacks"] == [], row
    # the strategy placed at load is the one that ran (sized for the card, default lookahead: no suffix)
    assert row["label"] == row["placed"]["label"] and "lookahead" not in row["label"], row
    transformer, text_encoder = row["residency"]
    assert transformer > 0, row  # it keeps some blocks: streaming them all is what `streamed` does
    assert row["reserved_gib"] <= cap
    assert not row["vae_tiling"] and close(image, reference), (np.abs(image - reference).max(), _psnr(image, reference))
    assert row["speeds"] is not None and row["speeds"]["source"] in ("measured", "cached")
    print(f"partial @ {cap} GiB: resident {transformer} + {text_encoder} blocks, first image {row['seconds'][0]:.2f} s")


@pytest.mark.parametrize(("cap", "lookahead"), [(8, 1), (6, 3)])
def test_partial_with_another_lookahead_stays_within_the_cap_and_gives_the_full_gpu_image(
    full_checkpoint: Path, cache: Path, reference: np.ndarray, tmp_path: Path, cap: int, lookahead: int
) -> None:
    """The default (2) runs in the tests above. ``lookahead=1`` is diffusers' group offloading as it is (no
    pacing hook); 3 lets the host run two streamed blocks ahead, which our pacing hook bounds, and the planner
    counts one more block than the default's."""
    row, image = run(
        full_checkpoint, cache, tmp_path / "image.npy", cap=cap, strategy={"lookahead": lookahead}, images=3
    )
    assert row["strategy"] == "partial" and row["fallbacks"] == [], row
    assert row["label"] == row["placed"]["label"] and row["label"].endswith(f"+lookahead{lookahead}"), row
    assert row["reserved_gib"] <= cap
    assert close(image, reference), (np.abs(image - reference).max(), _psnr(image, reference))
    seconds = [round(s, 3) for s in row["seconds"]]
    print(f"partial lookahead {lookahead} @ {cap} GiB: {row['label']}, work per image {seconds}")


def test_auto_picks_partial_on_an_8_gib_card(
    full_checkpoint: Path, cache: Path, reference: np.ndarray, tmp_path: Path
) -> None:
    row, image = run(full_checkpoint, cache, tmp_path / "image.npy", cap=8, strategy="auto")
    assert row["strategy"] == "partial" and row["fallbacks"] == [] and row["reserved_gib"] <= 8, row
    assert close(image, reference) or row["vae_tiling"]  # tiles blend at their seams: not the same image


def test_running_out_of_memory_halves_the_resident_blocks_before_another_strategy(
    full_checkpoint: Path, cache: Path, reference: np.ndarray, tmp_path: Path
) -> None:
    """Everything resident does not fit 8 GiB: the ladder halves the resident blocks until it does."""
    row, image = run(full_checkpoint, cache, tmp_path / "image.npy", cap=8, strategy=[34, 36])
    first = row["fallbacks"][0]
    assert first.startswith("strategy: partial(34,36) -> partial(17,18) (place:"), row
    halvings = [f for f in row["fallbacks"] if f.startswith("strategy: partial(")]
    assert all(" -> partial(" in f for f in halvings), row  # no other strategy was needed
    assert row["strategy"] == "partial" and row["reserved_gib"] <= 8
    assert close(image, reference) or row["vae_tiling"]


def test_partial_with_fp8_blocks(full_checkpoint: Path, cache: Path, reference: np.ndarray, tmp_path: Path) -> None:
    row, image = run(full_checkpoint, cache, tmp_path / "image.npy", cap=8, quantization="fp8")
    assert row["strategy"] == "partial" and row["quantization"] == "fp8" and row["fallbacks"] == [], row
    assert row["reserved_gib"] <= 8
    psnr = _psnr(image, reference)
    print(f"partial+fp8 @ 8 GiB against bf16 full_gpu: PSNR {psnr:.1f} dB")
    assert psnr > 15  # the suite's bound for fp8 with random weights (tests/gpu/test_gpu_acceleration.py)


def test_partial_compiles_its_resident_blocks_and_the_insides_of_streamed_ones(
    full_checkpoint: Path, cache: Path, reference: np.ndarray, tmp_path: Path
) -> None:
    row, image = run(full_checkpoint, cache, tmp_path / "image.npy", cap=12, images=3, compile="on")
    assert row["strategy"] == "partial" and row["fallbacks"] == [] and row["reserved_gib"] <= 12, row
    assert "blocks" in row["compiled"] and "text_encoder" not in row["compiled"]  # it streams: eager
    # the streamed blocks' attention, feed-forward and norms run compiled beneath their hooks
    assert row["insides_compiled"] > 0, row
    print(f"partial compiled @ 12 GiB: {row['label']}, work per image {[round(s, 3) for s in row['seconds']]}")
    assert close(image, reference), (np.abs(image - reference).max(), _psnr(image, reference))


def test_this_gpus_speeds_are_measured_quickly_and_kept(cache: Path) -> None:
    started = time.perf_counter()
    speeds = calibration.measure_speeds(torch.device("cuda", 0))
    seconds = time.perf_counter() - started
    print(f"{speeds.describe()} in {seconds:.2f} s")
    assert seconds < 5
    assert 5 < speeds.h2d_gib_per_s < 200 and 20 < speeds.bf16_tflops < 5000
    if torch.cuda.get_device_capability(0) >= (8, 9):
        assert speeds.fp8_tflops is not None and speeds.fp8_tflops > speeds.bf16_tflops
    # the processes above kept one entry for this GPU, driver and PyTorch in the shared cache folder
    kept = calibration.read_speeds(cache / calibration.SPEEDS_FILE)
    assert calibration.gpu_key(0) in kept
    assert abs(kept[calibration.gpu_key(0)].h2d_gib_per_s - speeds.h2d_gib_per_s) < 0.3 * speeds.h2d_gib_per_s
