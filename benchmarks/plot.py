"""Draw a benchmark JSON (benchmarks/full_gpu.py, multi_gpu.py, or the strategies.py that `zimage-turbo bench`
replaced) as a PNG next to it. The harness draws its own plots.

python benchmarks/plot.py benchmarks/results/full_gpu-h200.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_full_gpu(report: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in report["cases"] if "error" not in c]
    step_counts = sorted({s for c in cases for s in c["steps"]}, key=int)
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(step_counts), 1)
    for k, steps in enumerate(step_counts):
        values = [c["steps"][steps]["median_s"] for c in cases]
        bars = speed.bar([i + k * width for i in range(len(cases))], values, width, label=f"{steps} passes")
        speed.bar_label(bars, fmt="%.2f", fontsize=8)
    speed.set_xticks([i + width * (len(step_counts) - 1) / 2 for i in range(len(cases))])
    speed.set_xticklabels([c["mode"] for c in cases], fontsize=8)
    speed.set_ylabel("seconds per 1024x1024 image (median)")
    speed.set_ylim(0, 1.25 * max(c["steps"][s]["median_s"] for c in cases for s in step_counts))
    speed.legend(loc="upper right", ncols=len(step_counts))
    names = [c["mode"] for c in cases]
    positions = range(len(cases))
    memory.bar([p - 0.2 for p in positions], [c["peak_allocated_gib"] for c in cases], 0.4, label="GPU peak allocated")
    memory.bar([p + 0.2 for p in positions], [c["host_peak_rss_gib"] for c in cases], 0.4, label="host peak RSS")
    memory.set_xticks(list(positions))
    memory.set_xticklabels(names, fontsize=8)
    memory.set_ylabel("GiB")
    memory.set_ylim(0, 1.3 * max(max(c["peak_allocated_gib"], c["host_peak_rss_gib"]) for c in cases))
    memory.legend(loc="upper right", ncols=2)
    env = report["environment"]
    fig.suptitle(f"Full GPU, bf16, {env['gpu']}, torch {env['torch']}, diffusers {env['diffusers']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(target, dpi=120)


def plot_strategies(report: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in report["cases"] if "error" not in c]
    switched = [c for c in cases if c.get("case") == "switch"]
    capped = sorted(
        (c for c in cases if c.get("case") == "cap" and c.get("requested") == "auto"), key=lambda c: -c["cap_gib"]
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    names = [c["requested"] for c in switched]
    bars = left.bar(range(len(switched)), [c["s_per_image"] for c in switched], color="tab:blue")
    left.bar_label(bars, fmt="%.2f", fontsize=8)
    twin = left.twinx()
    twin.plot(range(len(switched)), [max(c["peak_gib"].values()) for c in switched], "o-", color="tab:red")
    twin.set_ylabel("GPU peak allocated (GiB)", color="tab:red")
    left.set_xticks(range(len(switched)))
    left.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    left.set_ylabel("s per 1024x1024 image (median)")
    left.set_title("each strategy, same weights, uncapped", fontsize=9)
    labels = [f"{c['cap_gib']:g} GiB\n{c['strategy']}" for c in capped]
    bars = right.bar(range(len(capped)), [c["s_per_image"] for c in capped], color="tab:green")
    right.bar_label(bars, fmt="%.2f", fontsize=8)
    right.set_xticks(range(len(capped)))
    right.set_xticklabels(labels, fontsize=8)
    right.set_ylabel("s per 1024x1024 image (median)")
    right.set_title("auto under a VRAM cap (set_per_process_memory_fraction)", fontsize=9)
    env = report["environment"]
    fig.suptitle(f"zimage-turbo strategies, bf16, 8 passes, {env['gpus'][0]}, torch {env['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(target, dpi=120)


def plot_multi_gpu(report: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_case = {c["case"]: c for c in report["cases"] if "error" not in c}
    cap = report.get("cap_gib", 12)
    labels = {
        "reference": "full_gpu\n1 GPU, uncapped",
        "dispatch_uncapped": "multi_gpu\n2 GPUs, uncapped",
        "dispatch": f"auto: {by_case.get('dispatch', {}).get('strategy', '?')}\n2 GPUs, {cap:g} GiB each",
        "streamed": f"streamed\n1 GPU, {cap:g} GiB",
    }
    shown = [name for name in labels if name in by_case]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [2, 1]})
    bars = left.bar(range(len(shown)), [by_case[n]["s_per_image"] for n in shown], color="tab:blue")
    left.bar_label(bars, fmt="%.2f", fontsize=8)
    left.set_xticks(range(len(shown)))
    left.set_xticklabels([labels[n] for n in shown], fontsize=8)
    left.set_ylabel("s per 1024x1024 image (median)")
    left.set_title("one model: split over two capped cards vs one card", fontsize=9)
    replicas = by_case.get("replicas")
    if replicas is not None:
        rates = [replicas["one_replica_images_per_s"], replicas["all_replicas_images_per_s"]]
        bars = right.bar([0, 1], rates, color=["tab:gray", "tab:green"])
        right.bar_label(bars, fmt="%.3f", fontsize=8)
        right.set_xticks([0, 1])
        right.set_xticklabels(["1 replica", f"{len(replicas['devices'])} replicas"], fontsize=8)
        right.set_ylabel("images per second")
        right.set_title(f"throughput, {replicas['prompts']} prompts ({replicas['speedup']:.2f}x)", fontsize=9)
    env = report["environment"]
    gpus = f"{len(env['gpus'])}x {env['gpus'][0]}" if env.get("gpus") else "no GPU"
    fig.suptitle(f"zimage-turbo on several GPUs, bf16, 8 passes, {gpus}, torch {env['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(target, dpi=120)


def main() -> None:
    source = Path(sys.argv[1])
    report = json.loads(source.read_text())
    target = source.with_suffix(".png")
    plotters = {"full_gpu": plot_full_gpu, "strategies": plot_strategies, "multi_gpu": plot_multi_gpu}
    if report.get("benchmark") not in plotters:
        raise SystemExit(f"{source}: no plot for benchmark {report.get('benchmark')!r}")
    plotters[report["benchmark"]](report, target)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
