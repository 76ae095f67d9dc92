"""Where loading time goes: the weights read straight to a GPU, or into pinned host homes, with 1 or more threads.

    python benchmarks/load_profile.py --checkpoint DIR [--threads 1 8]

Prints one line per variant (seconds and GB/s) and, for the host homes, how long pinning the buffers took.
Imports and the CUDA context are paid before the first variant, so they are not in any line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from zimage_turbo import check_pipeline_dir, host, weights
from zimage_turbo.loader import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    layout = check_pipeline_dir(args.checkpoint)
    total = sum(p.stat().st_size for c in layout.weight_files for p in layout.weight_paths(c))
    torch.ones(1, device="cuda")
    import diffusers  # noqa: F401  (imports out of the timings)
    import transformers  # noqa: F401

    rows = []
    reserve_seconds: list[float] = []
    original_reserve = host.HostHomes.reserve

    def timed_reserve(self: host.HostHomes, specs):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        result = original_reserve(self, specs)
        reserve_seconds.append(time.perf_counter() - started)
        return result

    host.HostHomes.reserve = timed_reserve  # type: ignore[method-assign]
    for threads in args.threads:
        weights.READ_THREADS = threads
        host.PIN_THREADS = max(1, min(threads, 4))
        for target in ("cuda", "homes"):
            reserve_seconds.clear()
            targets = {name: torch.device("cuda") for name in ("transformer", "text_encoder", "vae")}
            homes = host.HostHomes(pin=True)
            torch.cuda.synchronize()
            started = time.perf_counter()
            pipe = load_pipeline(
                layout, dtype=torch.bfloat16, targets=targets if target == "cuda" else {}, homes=homes, progress=False
            )
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            row = {
                "threads": threads,
                "target": target,
                "seconds": seconds,
                "gb_per_s": total / seconds / 1e9,
                "pinning_s": sum(reserve_seconds),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del pipe, homes
            torch.cuda.empty_cache()
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
