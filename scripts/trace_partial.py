"""Where a streamed pass's time goes: one image under a simulated VRAM cap, traced with torch.profiler.

On the GPU machine (issue 21): the planner predicts ~0.13 s per transformer pass for partial(13,0) at 8 GiB (bus
bound), the bench measures ~0.19 s. The trace shows the copy stream's host-to-device transfers against the compute
stream's kernels, so the summary says whether the bus is busy all the time (bandwidth bound), idle while compute
waits (a prefetch that starts too late), or both idle (host-side gaps).

    python3 scripts/trace_partial.py --checkpoint /tmp/full --budget-gib 8 --out "$OUT"
    python3 scripts/trace_partial.py --summarize "$OUT/trace-8gib.json"   # again, offline
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import time
from pathlib import Path
from typing import Any


def _intervals(events: list[dict[str, Any]]) -> list[tuple[float, float]]:
    return sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    total, j = 0.0, 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            total += max(0.0, min(end, b[k][1]) - max(start, b[k][0]))
            k += 1
    return total


def _block_copies(copies: list[dict[str, Any]]) -> dict[str, Any]:
    """The streamed blocks' copies on the stream that moved the most bytes: one burst of copies per block (its
    tensors, back to back). The interval between two bursts' starts against a burst's length is the bus's idle
    time per block: with one-ahead prefetch, the next copy starts only when the host reaches the next block."""
    moved: dict[Any, float] = {}
    for e in copies:
        stream = e.get("args", {}).get("stream")
        moved[stream] = moved.get(stream, 0.0) + float(e.get("args", {}).get("bytes", 0) or 0)
    if not moved:
        return {}
    busiest = max(moved, key=lambda key: moved[key])
    bursts: list[list[float]] = []
    for e in sorted((e for e in copies if e.get("args", {}).get("stream") == busiest), key=lambda e: e["ts"]):
        start, end = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))
        size = float(e.get("args", {}).get("bytes", 0) or 0)
        if bursts and start - bursts[-1][1] < 100:  # within 0.1 ms of the last copy: the same block
            bursts[-1][1] = max(bursts[-1][1], end)
            bursts[-1][2] += size
        else:
            bursts.append([start, end, size])
    blocks = [b for b in bursts if b[2] > 2**26]  # 64 MiB and more: a block, not a stray small tensor
    if len(blocks) < 3:
        return {}
    lengths = sorted(b[1] - b[0] for b in blocks)
    intervals = sorted(later[0] - earlier[0] for earlier, later in itertools.pairwise(blocks))
    typical = intervals[len(intervals) // 2]
    within_pass = [i for i in intervals if i < 3 * typical]  # longer ones span a pass boundary or a phase
    median_length = lengths[len(lengths) // 2]
    return {
        "block_copies": len(blocks),
        "block_copy_median_ms": median_length / 1e3,
        "block_copy_gib": sorted(b[2] for b in blocks)[len(blocks) // 2] / 2**30,
        "copy_start_interval_median_ms": typical / 1e3,
        "bus_idle_between_blocks_s": sum(max(0.0, i - median_length) for i in within_pass) / 1e6,
    }


def summarize(trace: dict[str, Any]) -> dict[str, Any]:
    """Busy time of the bus (host-to-device copies) and of the compute kernels, over the traced image's span."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    copies = [e for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in str(e.get("name", ""))]
    if not kernels:
        return {"error": "no kernels in the trace"}
    compute = _union(_intervals(kernels))
    bus = _union(_intervals(copies))
    span_start = min(compute[0][0], bus[0][0] if bus else compute[0][0])
    span_end = max(compute[-1][1], bus[-1][1] if bus else compute[-1][1])
    span = span_end - span_start
    both = _overlap(compute, bus)
    copied = sum(float(e.get("args", {}).get("bytes", 0) or 0) for e in copies)
    streams: dict[str, float] = {}
    for e in kernels + copies:
        key = f"{e.get('cat')}@stream{e.get('args', {}).get('stream')}"
        streams[key] = streams.get(key, 0.0) + float(e.get("dur", 0))
    return {
        **_block_copies(copies),
        "span_s": span / 1e6,
        "compute_busy_s": _length(compute) / 1e6,
        "bus_busy_s": _length(bus) / 1e6,
        "both_busy_s": both / 1e6,
        "neither_busy_s": (span - _length(compute) - _length(bus) + both) / 1e6,
        "copied_gib": copied / 2**30,
        "bus_gib_per_s_while_busy": copied / 2**30 / (_length(bus) / 1e6) if bus else None,
        "copies": len(copies),
        "kernels": len(kernels),
        "busy_by_stream_s": {k: v / 1e6 for k, v in sorted(streams.items())},
    }


def trace(checkpoint: str, budget_gib: float, strategy: str, size: int, out: Path) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(budget_gib * 2**30 / total)
    from zimage_turbo import Generator, ZImageSettings

    gen = Generator(settings=ZImageSettings(model=checkpoint, source="local", progress=False), strategy=strategy).load()
    prompt = "a lighthouse on a cliff at dusk, oil painting"
    gen.generate(prompt, width=size, height=size, steps=8, seed=1)  # warm-up: kernels, attention timing
    torch.cuda.synchronize()
    started = time.perf_counter()
    plain = gen.generate(prompt, width=size, height=size, steps=8, seed=2)
    torch.cuda.synchronize()
    untraced_s = time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        traced = gen.generate(prompt, width=size, height=size, steps=8, seed=2)
        torch.cuda.synchronize()
    path = out / f"trace-{budget_gib:g}gib.json"
    prof.export_chrome_trace(str(path))
    data = json.loads(path.read_text(encoding="utf-8"))
    summary = {
        "budget_gib": budget_gib,
        "strategy": plain.strategy,
        "untraced_s": untraced_s,
        "untraced_timings": vars(plain.timings),
        "traced_timings": vars(traced.timings),
        **summarize(data),
    }
    with gzip.open(str(path) + ".gz", "wt", encoding="utf-8") as f:
        json.dump(data, f)
    path.unlink()
    gen.close()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--budget-gib", type=float, nargs="+", default=[8.0], help="one per process is safest")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--summarize", type=Path, help="summarize a saved trace (.json or .json.gz) and stop")
    args = parser.parse_args()
    if args.summarize is not None:
        opener = gzip.open if args.summarize.suffix == ".gz" else open
        with opener(str(args.summarize), "rt", encoding="utf-8") as f:
            print(json.dumps(summarize(json.load(f)), indent=1))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for budget in args.budget_gib:
        summary = trace(args.checkpoint, budget, args.strategy, args.size, args.out)
        print(json.dumps(summary, indent=1, default=str))
        (args.out / f"trace-{budget:g}gib-summary.json").write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
