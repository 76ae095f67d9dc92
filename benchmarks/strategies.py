"""Every strategy, and ``auto`` under simulated VRAM budgets, on the full-size checkpoint.

Two kinds of case, each in a fresh process:

* ``--switch``: uncapped, full_gpu first (the reference image), then every other strategy applied in turn on
  the same loaded weights; per strategy: s/image, peak GPU memory against the planner's prediction, host
  memory, and the image's difference from full_gpu's.
* ``--cap-gib N [--strategy S]``: the process is limited to N GiB per GPU with
  ``torch.cuda.set_per_process_memory_fraction`` (which the library's hardware detection sees), then
  ``Generator(strategy=S or "auto")`` makes images; we record what it chose, every fallback, s/image, and
  peaks measured and predicted.

    python benchmarks/strategies.py --checkpoint DIR --out results.json [--caps 80 24 16 12 8 6 4]

Timings are medians over the images after the first; the GPU tests (tests/gpu/test_strategies.py) run the same
cases and assert on everything but the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"
SEED = 7
GIB = 2**30
SWITCH_ORDER = ["full_gpu", "hybrid", "model_offload", "streamed", "sequential_offload"]
# Also measured: the streaming strategies with record_stream on (no synchronisation after each block).
RECORD_STREAM_VARIANTS = ["hybrid", "streamed"]


def _cap(gib: float | None) -> None:
    import torch

    if gib is None:
        return
    for index in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), index)


def _measure(gen: Any, size: tuple[int, int], images: int) -> tuple[Any, dict[str, Any]]:
    """Generate ``images`` times; return the first result and the measurements of the last ones."""
    width, height = size
    results = []
    times = []
    for _ in range(images):
        started = time.perf_counter()
        results.append(gen.generate(PROMPT, width=width, height=height, seed=SEED))
        times.append(time.perf_counter() - started)
    last = results[-1]
    gpu_peaks = {k: v / GIB for k, v in last.peak_memory.items() if k.startswith("cuda")}
    predicted = {k: v / GIB for k, v in last.predicted_peak_memory.items()}
    homes = getattr(gen.pipeline, "_zimage_turbo_homes", None)
    row = {
        "strategy": last.strategy,
        "vae_tiling": last.vae_tiling,
        "fallbacks": [str(f) for r in results for f in r.fallbacks],
        "first_image_s": times[0],
        "s_per_image": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "all_s": times,
        "peak_gib": gpu_peaks,
        "predicted_gib": predicted,
        "host_peak_rss_gib": last.peak_memory["host"] / GIB,
        "host_homes_gib": (homes.host_bytes / GIB) if homes is not None else 0.0,
        "width": last.width,
        "height": last.height,
    }
    return results[0], row


def _difference(a: Any, b: Any) -> dict[str, float]:
    import numpy as np

    x = np.asarray(a).astype(np.int16)
    y = np.asarray(b).astype(np.int16)
    return {"max_abs": float(np.abs(x - y).max()), "mean_abs": float(np.abs(x - y).mean())}


def worker_switch(checkpoint: str, size: tuple[int, int], images: int, save: Path | None) -> list[dict[str, Any]]:
    from zimage_turbo import Generator, ZImageSettings

    started = time.perf_counter()
    gen = Generator(model=checkpoint, strategy="full_gpu", settings=ZImageSettings(progress=False), load=True)
    load_s = time.perf_counter() - started
    rows = []
    reference = None
    from zimage_turbo.strategies import STRATEGIES

    variants = [(name, False) for name in SWITCH_ORDER] + [(name, True) for name in RECORD_STREAM_VARIANTS]
    for name, record_stream in variants:
        switched = time.perf_counter()
        gen.switch(STRATEGIES[name](record_stream=True) if record_stream else name)  # type: ignore[call-arg]
        switch_s = time.perf_counter() - switched
        first, row = _measure(gen, size, images)
        if reference is None:
            reference = first.image
            if save is not None:
                first.image.save(save)
        requested = name + ("+record_stream" if record_stream else "")
        row.update(case="switch", requested=requested, switch_s=switch_s, load_s=load_s if name == "full_gpu" else None)
        row["difference_from_full_gpu"] = _difference(first.image, reference)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def worker_cap(
    checkpoint: str, cap: float | None, strategy: str, size: tuple[int, int], images: int, reference: Path | None
) -> dict[str, Any]:
    _cap(cap)
    from PIL import Image

    from zimage_turbo import Generator, ZImageSettings

    started = time.perf_counter()
    gen = Generator(model=checkpoint, strategy=strategy, settings=ZImageSettings(progress=False))
    gen.load()
    load_s = time.perf_counter() - started
    first, row = _measure(gen, size, images)
    row.update(case="cap", cap_gib=cap, requested=strategy, load_s=load_s)
    if reference is not None and not reference.is_file() and strategy == "full_gpu" and cap is None:
        first.image.save(reference)  # the uncapped full_gpu image is the reference for the other cases
    elif reference is not None and reference.is_file() and (row["width"], row["height"]) == size:
        row["difference_from_full_gpu"] = _difference(first.image, Image.open(reference))
    return row


def run_case(args: list[str], timeout: float = 580) -> dict[str, Any] | list[dict[str, Any]]:
    """Run one case in a fresh process; returns its JSON (or {"error": ...})."""
    command = [sys.executable, __file__, *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout)[-3000:]}
    return json.loads(lines[-1].removeprefix("RESULT "))  # type: ignore[no-any-return]


def environment() -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    return {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "git_commit": os.environ.get("ZT_GIT_COMMIT", "unknown"),
    }


def _size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", type=Path, help="JSON file for the whole run")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--images", type=int, default=3, help="images per case (the first is the warm-up)")
    parser.add_argument("--caps", type=float, nargs="*", default=[80, 24, 16, 12, 8, 6, 4])
    parser.add_argument("--forced", nargs="*", default=["full_gpu@16", "full_gpu@21"], help="STRATEGY@CAP cases")
    parser.add_argument("--no-switch", action="store_true", help="skip the uncapped switching case")
    parser.add_argument("--worker", choices=["switch", "cap"], help=argparse.SUPPRESS)
    parser.add_argument("--cap-gib", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = _size(args.size)

    if args.worker == "switch":
        result: Any = worker_switch(args.checkpoint, size, args.images, args.reference)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.worker == "cap":
        result = worker_cap(args.checkpoint, args.cap_gib, args.strategy, size, args.images, args.reference)
        print("RESULT " + json.dumps(result), flush=True)
        return

    reference = (args.out.parent if args.out else Path(".")) / "reference-full_gpu.png"
    common = ["--checkpoint", args.checkpoint, "--size", args.size, "--images", str(args.images)]
    rows: list[dict[str, Any]] = []
    report = {
        "benchmark": "strategies",
        "size": args.size,
        "prompt": PROMPT,
        "environment": environment(),
        "cases": rows,
    }
    if not args.no_switch:
        switched = run_case([*common, "--worker", "switch", "--reference", str(reference)])
        rows.extend(switched if isinstance(switched, list) else [switched])
        _write(args.out, report)
    cases: list[tuple[str, float | None]] = []
    if args.no_switch and not reference.is_file():
        cases.append(("full_gpu", None))  # makes the reference image
    cases += [("auto", cap) for cap in args.caps]
    for spec in args.forced:
        name, _, cap_text = spec.partition("@")
        cases.append((name, None if cap_text in ("", "none") else float(cap_text)))
    for strategy, cap in cases:
        command = [*common, "--worker", "cap", "--strategy", strategy, "--reference", str(reference)]
        row = run_case(command + (["--cap-gib", str(cap)] if cap is not None else []))
        assert isinstance(row, dict)
        row.setdefault("case", "cap")
        row.setdefault("cap_gib", cap)
        row.setdefault("requested", strategy)
        rows.append(row)
        print(json.dumps(row), flush=True)
        _write(args.out, report)  # after every case, so that an interrupted run keeps what it measured


def _write(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
