"""``partial`` with lookahead 1 (group offloading as it is) and 2 (the default) on the same weights, per cap.

On the GPU machine (issue 21). The trace of partial(13,0) at 8 GiB (scripts/trace_partial.py,
benchmarks/results/trace-partial-8gib-h200-2026-11-29.json) showed the bus idle for 0.33 s of a 1.7 s image:
with lookahead 1 the copy of a streamed block starts only when the streamed block before it computes, and the
host waits for each streamed block's compute. ``PartialOffload(lookahead=2)`` lets copies start as soon as the
bus is free (the host up to one streamed block ahead of the GPU). This measures both, each sized by the planner
for the cap (``Generator.switch``), with the GPU peaks and the largest pixel difference between the two images.

    python3 scripts/partial_lookahead.py --checkpoint /tmp/full --caps 12 8 6 4 --out "$OUT" [--trace]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zimage_turbo import Generator, ZImageSettings
from zimage_turbo.strategies import PartialOffload

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def _timed(gen: Generator, images: int, size: int) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    first = gen.generate(PROMPT, width=size, height=size, steps=8, seed=1)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, denoise = [], []
    for _ in range(images):
        started = time.perf_counter()
        result = gen.generate(PROMPT, width=size, height=size, steps=8, seed=1)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        denoise.append(result.timings.denoise)
    return {
        "strategy": result.strategy,
        "fallbacks": [str(step) for step in result.fallbacks],
        "s_per_image": statistics.median(times),
        "denoise_s": statistics.median(denoise),
        "all_s": times,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "_image": np.asarray(first.image, dtype=np.int16),
    }


def _traced(gen: Generator, size: int) -> dict[str, Any]:
    """Where one image's time went: the bus, the compute, both, neither (trace_partial.summarize)."""
    from torch.profiler import ProfilerActivity, profile
    from trace_partial import summarize  # beside this script

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen.generate(PROMPT, width=size, height=size, steps=8, seed=1)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        return summarize(json.loads(path.read_text(encoding="utf-8")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--caps", nargs="+", type=float, default=[8.0], help="GiB")
    parser.add_argument("--lookaheads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--trace", action="store_true", help="also trace one image of each (scripts/trace_partial.py)")
    parser.add_argument("--compile", action="store_true", help="compile the resident blocks (compile='on')")
    parser.add_argument("--attention", default="auto", help="the attention setting (the bench harness uses native)")
    args = parser.parse_args()
    gen: Generator | None = None
    rows: list[dict[str, Any]] = []
    for cap in args.caps:
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(cap * 2**30 / total)
        images: dict[int, Any] = {}
        for lookahead in args.lookaheads:
            strategy = PartialOffload(lookahead=lookahead)
            if gen is None:
                settings = ZImageSettings(
                    model=args.checkpoint,
                    source="local",
                    progress=False,
                    compile="on" if args.compile else "off",
                    attention=args.attention,
                )
                gen = Generator(settings=settings, strategy=strategy).load()
            else:
                gen.switch(strategy)
            row = {"cap_gib": cap, "lookahead": lookahead, "placed": repr(gen.strategy)}
            row.update(_timed(gen, args.images, args.size))
            images[lookahead] = row.pop("_image")
            row["max_diff_vs_first"] = int(np.abs(images[lookahead] - images[args.lookaheads[0]]).max())
            if args.trace and torch.cuda.is_available():
                row["trace"] = _traced(gen, args.size)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "partial_lookahead.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
