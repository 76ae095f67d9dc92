"""Speed on one GPU, side by side with plain diffusers at the same number of transformer passes.

    python benchmarks/speed.py --checkpoint /tmp/full --out benchmarks/results/speed-h200-DATE.json
    python benchmarks/speed.py --checkpoint - --out benchmarks/results/speed-h200-DATE.json --plot-only

Each case runs in a fresh process (``zimage_turbo.bench.worker``): a warm-up image, then ``--images`` timed
ones (median). Cases, in this order:

* our ``full_gpu`` with each attention kernel, eager (the first writes the reference image that every later
  case is compared with), and with ``attention="auto"``;
* plain diffusers ``.to("cuda")``; ours with ``compile="all"`` (every part compiled at once; twice: the second
  process finds Inductor's kernels cached), then diffusers with ``compile_repeated_blocks`` (it finds the cache
  warm too: compare its s/image, not its first image);
* ours fp8 + compile and fp8 eager;
* under a 12 GiB cap, ours with ``quantization="auto"`` (the planner's small-card rung) against diffusers'
  fastest mode there, block-level group offload; under 4 GiB, ours ``auto`` (bf16, and with
  ``quantization="auto"``, which streams fp8 blocks, eagerly and with ``compile="on"``, which compiles the fp8
  layers' arithmetic) against the same;
* last, diffusers with torchao fp8 + compile as its documentation shows (its compile is the slowest case).

Also written: the card's bf16 matmul rate (the physical floor next to the numbers) and a PNG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from zimage_turbo.bench.runner import run_case
from zimage_turbo.bench.worker import Spec

# (key, kind, mode, budget GiB, options)
CASES: list[tuple[str, str, str, float | None, dict[str, str]]] = [
    ("ours full_gpu native", "ours", "full_gpu", None, {"attention": "native", "compile": "off"}),
    ("ours full_gpu flash", "ours", "full_gpu", None, {"attention": "flash", "compile": "off"}),
    ("ours full_gpu cudnn", "ours", "full_gpu", None, {"attention": "cudnn", "compile": "off"}),
    ("ours full_gpu efficient", "ours", "full_gpu", None, {"attention": "efficient", "compile": "off"}),
    ("ours full_gpu auto-attention", "ours", "full_gpu", None, {"compile": "off"}),
    ("diffusers to_cuda", "diffusers", "to_cuda", None, {}),
    ("ours full_gpu compiled", "ours", "full_gpu", None, {"compile": "all"}),
    ("ours full_gpu compiled (cache warm)", "ours", "full_gpu", None, {"compile": "all"}),
    ("diffusers to_cuda compiled", "diffusers", "to_cuda", None, {"compile": "on"}),
    ("ours full_gpu fp8 compiled", "ours", "full_gpu", None, {"compile": "all", "quantization": "fp8"}),
    ("ours full_gpu fp8", "ours", "full_gpu", None, {"compile": "off", "quantization": "fp8"}),
    ("ours auto @12 quantization=auto", "ours", "auto", 12.0, {"compile": "on", "quantization": "auto"}),
    ("diffusers group_offload @12", "diffusers", "group_offload", 12.0, {}),
    ("ours auto @4", "ours", "auto", 4.0, {}),
    ("ours auto @4 quantization=auto", "ours", "auto", 4.0, {"quantization": "auto"}),
    ("ours auto @4 quantization=auto compile=on", "ours", "auto", 4.0, {"quantization": "auto", "compile": "on"}),
    ("diffusers group_offload @4", "diffusers", "group_offload", 4.0, {}),
    # last: torchao's fp8 settings make Inductor tune its kernels, and this compile took over 100 s on the H200
    ("diffusers to_cuda fp8 compiled", "diffusers", "to_cuda", None, {"compile": "on", "quantize": "fp8"}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="run only the cases whose key contains one of these")
    parser.add_argument("--skip", nargs="*", default=[], help="leave out the cases whose key contains one of these")
    parser.add_argument("--rounds", type=int, default=1, help="run the chosen cases this many times, interleaved")
    parser.add_argument("--case-timeout-s", type=float, default=240)
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG of the existing --out JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        _plot(json.loads(args.out.read_text(encoding="utf-8")), args.out.with_suffix(".png"))
        return 0
    # the compile cases share one kernel cache, fresh for this run, so that "cache warm" means this run's
    cache = args.out.with_name(args.out.stem + "-inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache.resolve())
    reference = args.out.with_name(args.out.stem + "-reference.png")
    reference.unlink(missing_ok=True)
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "benchmark": "speed",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": os.environ.get("ZT_GIT_COMMIT", "unknown"),
        "settings": {"steps": args.steps, "images": args.images, "size": "1024x1024"},
        "floor": _floor(),
        "cases": rows,
    }
    chosen = [
        case
        for case in CASES
        if not (args.only and not any(part in case[0] for part in args.only))
        and not any(part in case[0] for part in args.skip)
    ]
    # Rounds interleave the cases (A B A B), so that a drift of the machine does not favour one side.
    rounds = [
        (f"{key} #{n + 1}" if args.rounds > 1 else key, *rest) for n in range(args.rounds) for key, *rest in chosen
    ]
    for key, kind, mode, budget, options in rounds:
        spec = Spec(
            kind=kind,
            mode=mode,
            checkpoint=str(args.checkpoint),
            key=key,
            budget_gib=budget,
            steps=args.steps,
            images=args.images,
            reference=str(reference),
            options=options,
        )
        row = run_case(spec, args.case_timeout_s)
        row["options"] = options
        rows.append(row)
        _print(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    _plot(report, args.out.with_suffix(".png"))
    return 0


def _print(row: dict[str, Any]) -> None:
    if row.get("status") != "ok":
        print(f"{row['key']:40} {row.get('status')}: {str(row.get('error', ''))[:300]}", flush=True)
        return
    diff = row.get("difference", {})
    print(
        f"{row['key']:40} {row['s_per_image']:6.3f} s/image  first {row['first_image_s']:6.2f} s  "
        f"cold {row.get('since_process_start_s', 0):5.1f} s  load {row.get('load_s', 0):5.1f} s  "
        f"max|diff| {diff.get('max_abs', float('nan')):5.1f}  attention {row.get('attention', '-')}  "
        f"denoise {row.get('timings', {}).get('denoise', float('nan')):.3f}",
        flush=True,
    )


def _floor() -> dict[str, float]:
    """The card's bf16 matmul rate, for the compute floor (the same measurement as the harness's probe)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return {}
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        rates = []
        for k in range(13):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            if k >= 3:
                rates.append(2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e12)
        return {"bf16_matmul_tflops": statistics.median(rates), "gpu": torch.cuda.get_device_name(0)}
    except Exception as exc:  # the floor is context, not a reason to lose the run
        print(f"floor not measured: {exc}", file=sys.stderr)
        return {}


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["cases"] if r.get("status") == "ok"]
    if not rows:
        return
    figure, axis = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.2))
    labels = [r["key"] for r in rows]
    values = [r["s_per_image"] for r in rows]
    colours = ["#1f77b4" if r["kind"] == "ours" else "#999999" for r in rows]
    axis.barh(labels, values, color=colours)
    for y, value in enumerate(values):
        axis.text(value, y, f" {value:.2f}", va="center", fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel(f"s/image (median), 1024x1024, {report['settings']['steps']} transformer passes")
    title = report.get("floor", {}).get("gpu", "GPU")
    axis.set_title(f"{title}: ours (blue) and plain diffusers (grey)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
