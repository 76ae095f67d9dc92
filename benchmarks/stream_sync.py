"""Streaming, synchronised or not: where block streaming's time goes, bf16 and fp8, in one process.

    python benchmarks/stream_sync.py --checkpoint DIR --out benchmarks/results/stream_sync-h100-DATE.json

diffusers' group offloading, unless ``record_stream`` is on, synchronises the compute stream after every
block (before dropping the block's GPU copy), so the host cannot queue the next block's kernels while the
GPU runs this one: per block, the host's launch time and the GPU's work add up instead of overlapping.
Eager fp8 layers launch several kernels each (the activation is quantized in kernels of its own), so they
suffer most. This runs, in one process and one loaded model, each of:

* ``full_gpu`` bf16 and ``full_gpu`` fp8 (eager): the compute alone, and the reference images;
* ``streamed`` bf16 and fp8, with ``record_stream`` off (the synchronising default) and on;

each with a warm-up image and ``--images`` timed ones (median), the streamed ones under a
``--budget-gib`` cap (``set_per_process_memory_fraction``), with their GPU peak and the largest pixel
difference from the full-GPU image of the same precision.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zimage_turbo import Generator, ZImageSettings
from zimage_turbo.strategies import FullGPU, LoadStrategy, StreamedOffload

PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"


def _configs() -> list[tuple[str, LoadStrategy, bool]]:
    """(name, strategy, capped): full-GPU first, as references, then the capped streamed ones."""
    return [
        ("full_gpu bf16", FullGPU(), False),
        ("full_gpu fp8", FullGPU(quantize="fp8"), False),
        ("streamed bf16 sync", StreamedOffload(), True),
        ("streamed bf16 record_stream", StreamedOffload(record_stream=True), True),
        ("streamed fp8 sync", StreamedOffload(quantize="fp8"), True),
        ("streamed fp8 record_stream", StreamedOffload(quantize="fp8", record_stream=True), True),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--budget-gib", type=float, default=4.0)
    parser.add_argument("--only", nargs="*", help="run only the configurations whose name contains one of these")
    args = parser.parse_args(argv)

    settings = ZImageSettings(progress=False, attention="native", compile="off")
    total = torch.cuda.get_device_properties(0).total_memory
    references: dict[str, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    with Generator(model=args.checkpoint, strategy="full_gpu", settings=settings) as generator:
        for name, strategy, capped in _configs():
            if args.only and not any(part in name for part in args.only) and not name.startswith("full_gpu"):
                continue
            started = time.perf_counter()
            generator.switch(strategy)
            switch_s = time.perf_counter() - started
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(args.budget_gib * 2**30 / total if capped else 1.0)
            row = _measure(generator, args)
            row.update(name=name, switch_s=switch_s, capped_gib=args.budget_gib if capped else None)
            precision = "fp8" if "fp8" in name else "bf16"
            pixels = row.pop("pixels")
            if precision not in references:
                references[precision] = pixels
            row["max_abs_diff"] = int(np.abs(pixels - references[precision]).max())
            rows.append(row)
            print(
                f"{name:30s} {row['s_per_image']:.3f} s/image  denoise {row['denoise_s']:.3f}  "
                f"peak {row['peak_gib']:.2f} GiB  max diff {row['max_abs_diff']}  ran {row['strategy']}"
                f"{' +fallbacks' if row['fallbacks'] else ''}  switch {switch_s:.1f} s",
                flush=True,
            )
    report = {
        "benchmark": "stream_sync",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": os.environ.get("ZT_GIT_COMMIT"),
        "device": torch.cuda.get_device_name(0),
        "settings": {"size": args.size, "steps": args.steps, "images": args.images, "budget_gib": args.budget_gib},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _measure(generator: Generator, args: argparse.Namespace) -> dict[str, Any]:
    def one(seed: int) -> Any:
        return generator.generate(PROMPT, height=args.size, width=args.size, steps=args.steps, seed=seed)

    first = one(0)  # warm-up; its image is the one compared (seed 0 in every configuration)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds, denoise = [], []
    for seed in range(1, args.images + 1):
        started = time.perf_counter()
        result = one(seed)
        seconds.append(time.perf_counter() - started)
        denoise.append(result.timings.denoise)
    return {
        "s_per_image": statistics.median(seconds),
        "all_s": seconds,
        "denoise_s": statistics.median(denoise),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "strategy": result.strategy,
        "quantization": result.quantization,
        "fallbacks": [str(f) for f in result.fallbacks],
        "pixels": np.asarray(first.image, dtype=np.int16),
    }


if __name__ == "__main__":
    raise SystemExit(main())
