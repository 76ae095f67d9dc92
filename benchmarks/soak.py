"""Soak: hundreds of generations in one process, with strategy switches, recording memory after each.

One Generator on the full-size checkpoint makes ``--generations`` images of a deterministic mix of sizes, a new
seed each, switching strategy every ``--switch-every`` images along ``--schedule``. After each image it records
``torch.cuda.memory_allocated`` and ``memory_reserved``, the peak of the call, the host RSS (as read, and after
``malloc_trim(0)`` hands freed heap back to the system), pinned host memory, threads and open files. What a leak
would look like: allocated memory creeping up within a strategy, or RSS growing once every strategy has been
visited. tests/gpu/test_soak.py states the pass criteria and checks a report.

    python benchmarks/soak.py --checkpoint DIR --out benchmarks/results/soak-h200-DATE.json
    python benchmarks/soak.py --plot-only benchmarks/results/soak-h200-DATE.json   # redraw the PNG

The PNG (allocated and RSS per generation, switches marked) is written next to the JSON when matplotlib is
installed. ``--device cpu`` runs the same bookkeeping on the CPU (the CPU tests use it with the tiny checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"
GIB = 2**30
MIB = 2**20
# (width, height); mean 0.57 megapixels, every strategy block sees all of them
SIZES = ["512x512", "768x768", "1024x1024", "1024x768", "768x1024", "512x768", "768x512", "512x512"]
# Every strategy is visited in the first half; the second half revisits them, which is where a leak would show.
SCHEDULE = ["full_gpu", "hybrid", "streamed", "model_offload", "full_gpu", "hybrid", "full_gpu", "model_offload"]
# Seconds per image on an H200 at 512x512 and 1024x1024, 8 passes, used only to print the expected duration.
# 1024x1024: benchmarks/results/strategies-h200-2026-11-23*.json. 512x512: full_gpu about 0.4 s (an earlier
# H200 run, not in results/); the others estimated from it plus their transfers. The report has the real ones.
H200_SECONDS = {
    "full_gpu": (0.40, 1.33),
    "hybrid": (0.50, 1.43),
    "model_offload": (0.80, 1.72),
    "streamed": (2.20, 2.68),
    "sequential_offload": (2.40, 2.90),
}
H200_SWITCH_S = 4.0  # a switch moves up to 20 GB between host and GPU: 0.1 to 5.7 s measured
H200_LOAD_S = 12.0


def expected_seconds(schedule: Sequence[str], sizes: Sequence[tuple[int, int]], steps: int) -> float:
    """Rough duration on an H200: load, each image by strategy and pixel count, each switch."""
    total = H200_LOAD_S
    previous = None
    for strategy, (width, height) in zip(schedule, sizes, strict=True):
        low, high = H200_SECONDS.get(strategy, (3.0, 3.0))
        fraction = (width * height - 512 * 512) / (1024 * 1024 - 512 * 512)
        total += (low + (high - low) * fraction) * steps / 8
        if previous is not None and strategy != previous:
            total += H200_SWITCH_S
        previous = strategy
    return total


def plan_run(
    generations: int, switch_every: int, schedule: Sequence[str], sizes: Sequence[str]
) -> list[dict[str, Any]]:
    """What each generation will be: strategy, size, seed. A pure function of the arguments."""
    runs = []
    for index in range(generations):
        width, height = (int(v) for v in sizes[index % len(sizes)].lower().split("x"))
        runs.append(
            {
                "index": index,
                "requested": schedule[(index // switch_every) % len(schedule)],
                "width": width,
                "height": height,
                "seed": 1000 + index,
            }
        )
    return runs


def warmup_generations(runs: Sequence[dict[str, Any]], switch_every: int) -> int:
    """Generations until every strategy of the run has had one full block (first visits allocate host homes
    and pinned buffers that later visits reuse)."""
    seen: set[str] = set()
    end = 0
    for run in runs:
        if run["requested"] not in seen:
            seen.add(run["requested"])
            end = min(len(runs), (run["index"] // switch_every + 1) * switch_every)
    return end


def _strategy(name: str, device: str) -> Any:
    """A strategy name as the Generator takes it; on the CPU an instance that runs the same hooks there."""
    if device != "cpu" or name in ("cpu", "auto"):
        return name
    from zimage_turbo.strategies import STRATEGIES

    return STRATEGIES[name](device="cpu")  # type: ignore[call-arg]


def _trim_heap() -> None:
    """Return freed heap memory to the system (glibc keeps it otherwise, which looks like a leak)."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(name).malloc_trim(0)


def measure(gen: Any, device: str) -> dict[str, Any]:
    import psutil
    import torch

    row: dict[str, Any] = {}
    if device == "cuda":
        torch.cuda.synchronize()
        row["allocated_bytes"] = torch.cuda.memory_allocated()
        row["reserved_bytes"] = torch.cuda.memory_reserved()
        # torch's pinned allocator: bytes it holds (in use and cached) and bytes handed out
        stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
        row["pinned_host_bytes"] = stats.get("allocated_bytes.current")
        row["pinned_active_bytes"] = stats.get("active_bytes.current")
    else:
        row["allocated_bytes"] = row["reserved_bytes"] = 0
        row["pinned_host_bytes"] = row["pinned_active_bytes"] = None
    process = psutil.Process()
    row["rss_bytes"] = process.memory_info().rss
    _trim_heap()
    row["rss_trimmed_bytes"] = process.memory_info().rss
    homes = getattr(gen.pipeline, "_zimage_turbo_homes", None)
    row["host_homes_bytes"] = homes.host_bytes if homes is not None else 0
    row["threads"] = threading.active_count()
    row["open_files"] = process.num_fds() if hasattr(process, "num_fds") else None
    return row


def environment(device: str) -> dict[str, Any]:
    import diffusers
    import torch

    import zimage_turbo

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "zimage_turbo": zimage_turbo.__version__,
        "git_commit": os.environ.get("ZT_GIT_COMMIT", "unknown"),
        "device": device,
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
    return env


def soak(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from zimage_turbo import Generator, ZImageSettings

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    runs = plan_run(args.generations, args.switch_every, args.schedule, args.sizes)
    estimate = expected_seconds([r["requested"] for r in runs], [(r["width"], r["height"]) for r in runs], args.steps)
    print(f"{len(runs)} generations, switching every {args.switch_every} along {', '.join(args.schedule)}", flush=True)
    print(f"expected duration on an H200: about {estimate / 60:.1f} min ({estimate:.0f} s)", flush=True)
    report: dict[str, Any] = {
        "benchmark": "soak",
        "generations": args.generations,
        "switch_every": args.switch_every,
        "schedule": list(args.schedule),
        "sizes": list(args.sizes),
        "steps": args.steps,
        "prompt": PROMPT,
        "expected_h200_seconds": estimate,
        "warmup_generations": warmup_generations(runs, args.switch_every),
        "environment": environment(device),
        "records": [],
    }
    started = time.perf_counter()
    first = runs[0]["requested"] if runs else "auto"
    gen = Generator(
        model=args.checkpoint,
        strategy=_strategy(first, device),
        # compile off: each new size would be compiled, which is by design and not what a soak looks for; the
        # compiled path is measured by benchmarks/speed.py
        settings=ZImageSettings(progress=False, compile="off"),
    ).load()
    report["load_seconds"] = time.perf_counter() - started
    report["after_load"] = measure(gen, device)
    current = first
    for run in runs:
        switch_seconds = None
        if run["requested"] != current:
            switched = time.perf_counter()
            gen.switch(_strategy(run["requested"], device))
            switch_seconds = time.perf_counter() - switched
            current = run["requested"]
        began = time.perf_counter()
        result = gen.generate(PROMPT, width=run["width"], height=run["height"], steps=args.steps, seed=run["seed"])
        seconds = time.perf_counter() - began
        record = {
            **run,
            "strategy": result.strategy,
            "image_size": list(result.image.size),
            "seconds": seconds,
            "switch_seconds": switch_seconds,
            "peak_allocated_bytes": max((v for k, v in result.peak_memory.items() if k.startswith("cuda")), default=0),
            "fallbacks": [str(f) for f in result.fallbacks],
            "vae_tiling": result.vae_tiling,
            **measure(gen, device),
        }
        report["records"].append(record)
        print(
            f"{run['index']:4d} {record['strategy']:<14} {run['width']}x{run['height']:<5} {seconds:6.2f} s  "
            f"allocated {record['allocated_bytes'] / GIB:6.2f} GiB  rss {record['rss_trimmed_bytes'] / GIB:6.2f} GiB",
            flush=True,
        )
        if run["index"] % 10 == 9:
            _write(args.out, report)  # an interrupted run keeps what it measured
    report["total_seconds"] = time.perf_counter() - started
    report["summary"] = summarize(report)
    gen.close()
    _write(args.out, report)
    return report


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Per strategy: allocated after each generation (median, spread); host RSS after the warm-up."""
    records = report["records"]
    per_strategy: dict[str, Any] = {}
    for name in dict.fromkeys(r["strategy"] for r in records):
        values = [r["allocated_bytes"] for r in records if r["strategy"] == name]
        median = statistics.median(values)
        per_strategy[name] = {
            "generations": len(values),
            "allocated_median_gib": median / GIB,
            "allocated_max_deviation_mib": max(abs(v - median) for v in values) / MIB,
            "seconds_median": statistics.median(r["seconds"] for r in records if r["strategy"] == name),
        }
    after = [r["rss_trimmed_bytes"] for r in records[report["warmup_generations"] :]]
    summary: dict[str, Any] = {"per_strategy": per_strategy}
    if len(after) >= 2:
        summary["rss_after_warmup_start_gib"] = after[0] / GIB
        summary["rss_after_warmup_max_rise_mib"] = (max(after) - after[0]) / MIB
        summary["rss_after_warmup_slope_mib_per_generation"] = _slope(after) / MIB
    return summary


def _slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against their index."""
    count = len(values)
    mean_x = (count - 1) / 2
    mean_y = sum(values) / count
    numerator = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    denominator = sum((x - mean_x) ** 2 for x in range(count))
    return numerator / denominator if denominator else 0.0


def plot(report: dict[str, Any], target: Path) -> bool:
    """Allocated and reserved GPU memory and host RSS per generation, switches marked. False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", flush=True)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["records"]
    x = [r["index"] for r in records]
    fig, (gpu, host) = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    gpu.plot(x, [r["allocated_bytes"] / GIB for r in records], ".-", ms=3, label="allocated after the generation")
    gpu.plot(x, [r["reserved_bytes"] / GIB for r in records], "--", lw=1, label="reserved")
    gpu.plot(x, [r["peak_allocated_bytes"] / GIB for r in records], ":", lw=1, label="peak during the generation")
    gpu.set_ylabel("GPU GiB")
    gpu.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    host.plot(x, [r["rss_trimmed_bytes"] / GIB for r in records], ".-", ms=3, color="tab:green", label="RSS")
    pinned = [r.get("pinned_host_bytes") for r in records]
    if all(p is not None for p in pinned):
        host.plot(x, [p / GIB for p in pinned], "--", lw=1, color="tab:olive", label="pinned, held by torch")
    host.set_ylabel("host GiB")
    host.set_xlabel("generation")
    host.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    for axis in (gpu, host):
        axis.axvline(report["warmup_generations"] - 0.5, color="grey", lw=0.8, ls="-.")
    previous = None
    for record in records:
        if record["strategy"] != previous:
            for axis in (gpu, host):
                axis.axvline(record["index"] - 0.5, color="black", lw=0.6, ls=":")
            gpu.annotate(
                record["strategy"],
                (record["index"], 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                rotation=90,
                va="top",
                ha="left",
            )
            previous = record["strategy"]
    env = report["environment"]
    fig.suptitle(
        f"zimage-turbo soak: {len(records)} generations, {env.get('gpu', env['device'])}, torch {env['torch']} "
        f"(dash-dot line: end of warm-up)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return True


def _write(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="model folder (zimage-turbo make-checkpoint full DIR)")
    parser.add_argument("--out", type=Path, help="JSON report; the PNG goes next to it")
    parser.add_argument("--generations", type=int, default=200)
    parser.add_argument("--switch-every", type=int, default=25)
    parser.add_argument("--schedule", nargs="+", default=SCHEDULE, help="strategies, in turn")
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="WIDTHxHEIGHT, in turn")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--plot-only", type=Path, default=None, help="redraw the PNG of an existing report")
    args = parser.parse_args(argv)
    if args.plot_only is not None:
        report = json.loads(args.plot_only.read_text())
        plot(report, args.plot_only.with_suffix(".png"))
        return 0
    if not args.checkpoint or not args.out:
        parser.error("--checkpoint and --out are required")
    if args.generations < 1 or args.switch_every < 1:
        parser.error("--generations and --switch-every must be at least 1")
    report = soak(args)
    report["plot"] = None
    if not args.no_plot and plot(report, args.out.with_suffix(".png")):
        report["plot"] = args.out.with_suffix(".png").name
    _write(args.out, report)
    print(json.dumps(report["summary"], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
