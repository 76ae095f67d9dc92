"""Run a benchmark: every case in a fresh process, the JSON written after each, resumable.

    zimage-turbo bench --checkpoint DIR --out benchmarks/results/bench-h200.json [--docs docs/benchmarks.md]

``--checkpoint`` is a folder with a Z-Image pipeline (the real weights, or a random-weight checkpoint); if the
folder does not exist, the full-size random-weight checkpoint is built there first (on the GPU, under a
minute). ``--resume`` keeps the cases already in ``--out`` and runs the rest; ``--deadline-s`` stops starting
new cases after that many seconds (exit status 3, the JSON lists what is missing), so that a long run can be
split over several sessions of a GPU machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .cases import (
    BUDGETS,
    DIFFUSERS_MODES,
    OPTIONAL_MODES,
    OUR_STRATEGIES,
    SWEEP_BUDGETS,
    SWEEP_SIZES,
    Case,
    budget_label,
    decide,
    fitting_strategies,
    forced_case,
    summarize,
)
from .worker import PROMPT, Spec

__all__ = ["main", "run"]

EXIT_INCOMPLETE = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zimage-turbo bench",
        description="zimage-turbo against plain diffusers under simulated VRAM budgets, each case in a fresh process.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="pipeline folder (built if it does not exist)")
    parser.add_argument("--out", required=True, type=Path, help="JSON file for the run (a PNG plot is written beside)")
    parser.add_argument("--docs", type=Path, default=None, help="markdown file whose generated section to rewrite")
    parser.add_argument("--budgets", nargs="+", default=[budget_label(b) for b in BUDGETS], help="GiB, or 'unlimited'")
    parser.add_argument("--strategies", nargs="*", default=list(OUR_STRATEGIES), help="our named strategies to measure")
    parser.add_argument(
        "--diffusers-modes", nargs="*", default=list(DIFFUSERS_MODES), choices=(*DIFFUSERS_MODES, *OPTIONAL_MODES)
    )
    parser.add_argument("--sweep-budgets", nargs="*", default=[budget_label(b) for b in SWEEP_BUDGETS])
    parser.add_argument("--sweep-sizes", nargs="*", default=[f"{w}x{h}" for w, h in SWEEP_SIZES])
    parser.add_argument(
        "--forced",
        nargs="*",
        default=[],
        help="STRATEGY@BUDGET cases run even if not predicted to fit; STRATEGY@BUDGET:compile=on,quantization=fp8 "
        "with settings of their own",
    )
    parser.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT of the budget cases")
    parser.add_argument("--steps", type=int, default=8, help="transformer passes, the same on both sides")
    parser.add_argument("--images", type=int, default=3, help="timed images per case, after one warm-up")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: only to test the harness")
    parser.add_argument("--resume", action="store_true", help="keep the cases already in --out")
    parser.add_argument("--deadline-s", type=float, default=None, help="start no case after this many seconds")
    parser.add_argument("--case-timeout-s", type=float, default=600)
    parser.add_argument("--report-only", action="store_true", help="only redraw the plot and the markdown from --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    complete = True if args.report_only else run(args)
    report = json.loads(args.out.read_text(encoding="utf-8"))
    from .report import write_markdown, write_plot

    plot = write_plot(report, args.out.with_suffix(".png"))
    if plot is not None:
        print(f"wrote {plot}")
    if args.docs is not None:
        write_markdown(report, args.docs, json_name=args.out.name)
        print(f"updated {args.docs}")
    return 0 if complete else EXIT_INCOMPLETE


def run(args: argparse.Namespace) -> bool:
    """Run every case not yet in the report; True when none is left."""
    started = time.perf_counter()
    checkpoint = _ensure_checkpoint(args.checkpoint, args.device)
    report = _load_report(args.out) if args.resume and args.out.is_file() else _new_report(args, checkpoint)
    rows: list[dict[str, Any]] = report["cases"]
    done = {row["key"] for row in rows}
    width, height = (int(v) for v in args.size.lower().split("x"))
    base = {"checkpoint": str(checkpoint), "width": width, "height": height, "steps": args.steps}
    base.update(images=args.images, device=args.device, reference=str(_reference_path(args.out)))
    budgets = _budgets(args.budgets, args.device)

    if report.get("probe") is None:
        probe = _run_worker(Spec(kind="probe", mode="probe", key="probe", budgets=budgets, **base), args)
        if probe.get("status") != "ok":
            raise SystemExit(f"the probe failed: {probe.get('error')}")
        report["probe"] = probe
        _write(args.out, report)
    probe = report["probe"]

    pending: list[tuple[Case, dict[str, Any]]] = []
    for budget in budgets:
        pending.append((Case("ours", "auto", budget), {}))
        for name in fitting_strategies(probe["plans"], budget):
            if name in args.strategies:
                pending.append((Case("ours", name, budget), {}))
        pending += [(Case("diffusers", mode, budget), {}) for mode in args.diffusers_modes]
    pending += [forced_case(spec) for spec in args.forced]
    sweep_sizes = [[int(v) for v in size.lower().split("x")] for size in args.sweep_sizes]
    for budget in _budgets(args.sweep_budgets, args.device):
        pending.append((Case("sweep", "auto", budget), {"sweep_sizes": sweep_sizes, "mode": "auto"}))

    to_run = [case for case, _ in pending if case.key not in done]
    if to_run and not _reference_path(args.out).is_file() and not _writes_reference(to_run[0]):
        # A resumed or narrowed run that no longer starts with the case that draws the reference image
        # (last session's budgeted re-runs lost their "difference" so): draw it first, in a process of its own.
        _run_worker(Spec(**{**base, "kind": "ours", "mode": "auto", "key": "reference", "images": 1}), args)

    missing: list[str] = []
    for case, extra in pending:
        if case.key in done:
            continue
        inferred = decide(case, rows)
        if inferred is None and args.deadline_s is not None and time.perf_counter() - started > args.deadline_s:
            missing.append(case.key)
            continue
        if inferred is not None:
            row = inferred
        else:
            fields = {**base, "kind": case.kind, "mode": case.mode, "key": case.key, "budget_gib": case.budget_gib}
            row = _run_worker(Spec(**{**fields, **extra}), args)
            row.update(key=case.key, kind=case.kind, mode=case.mode)
        rows.append(row)
        done.add(case.key)
        _print_row(row)
        report["summary"] = summarize(rows, probe.get("weights_gib", 0.0), budgets)
        report["missing"] = missing
        _write(args.out, report)
    report["missing"] = missing
    report["summary"] = summarize(rows, probe.get("weights_gib", 0.0), budgets)
    _write(args.out, report)
    return not missing


def _budgets(labels: Sequence[str], device: str) -> list[float | None]:
    if device != "cuda":
        return [None]  # a CPU has no VRAM to cap
    return [None if label == "unlimited" else float(label) for label in labels]


def _ensure_checkpoint(path: Path, device: str) -> Path:
    if (path / "model_index.json").is_file():
        return path
    if path.exists() and any(path.iterdir()):
        raise SystemExit(f"{path} exists but holds no model_index.json: not a pipeline folder")
    from zimage_turbo.checkpoints import make_checkpoint

    print(f"building the full-size random-weight checkpoint in {path}", flush=True)
    started = time.perf_counter()
    made = make_checkpoint("full", path, device=device)
    print(f"built in {time.perf_counter() - started:.1f} s", flush=True)
    return made


def _new_report(args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    from zimage_turbo.checkpoints import read_marker

    return {
        "benchmark": "bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        # The folder's name only: paths of the machine that ran it say nothing to a reader.
        "checkpoint": {"name": checkpoint.name, "marker": read_marker(checkpoint)},
        "settings": {"size": args.size, "steps": args.steps, "images": args.images, "prompt": PROMPT},
        "probe": None,
        "cases": [],
    }


def _load_report(path: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return report


def _git_commit() -> str:
    """ZT_GIT_COMMIT when set (a copy of the tree on another machine may carry a stale .git), else git's HEAD."""
    given = os.environ.get("ZT_GIT_COMMIT")
    if given:
        return given
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def _writes_reference(case: Case) -> bool:
    """Whether the worker draws the reference image for this case (ours, no cap: see worker._compare)."""
    return case.kind == "ours" and case.budget_gib is None


def _reference_path(out: Path) -> Path:
    return out.with_name(out.stem + "-reference.png")


def _run_worker(spec: Spec, args: argparse.Namespace) -> dict[str, Any]:
    return run_case(spec, args.case_timeout_s)


def run_case(spec: Spec, timeout_s: float) -> dict[str, Any]:
    """Run one case in a fresh Python process; its row, or an error row."""
    command = [sys.executable, "-m", "zimage_turbo.bench.worker", json.dumps(asdict(spec))]
    base = {"key": spec.key, "kind": spec.kind, "mode": spec.mode, "budget_gib": spec.budget_gib}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**base, "status": "error", "error": f"timed out after {timeout_s:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (done.stderr or done.stdout)[-2000:]
        return {**base, "status": "error", "error": f"exit status {done.returncode}: {tail}"}
    row: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    if row.get("status") == "error":
        row["stderr_tail"] = done.stderr[-2000:]
    return row


def _print_row(row: dict[str, Any]) -> None:
    label = f"{row['key']:42}"
    if row.get("status") == "ok" and "s_per_image" in row:
        peak = max(row.get("peak_allocated_gib", {}).values(), default=0.0)
        shown = row.get("placement") or row.get("strategy")
        how = f" [{shown}]" if shown else ""
        note = f"  (inferred from {row['inferred_from']})" if row.get("inferred_from") else ""
        print(
            f"{label} {row['s_per_image']:6.2f} s/image  first {row['first_image_s']:5.2f} s  load "
            f"{row.get('load_s', 0.0):5.1f} s  GPU {peak:5.2f} GiB  host {row['host_peak_rss_gib']:5.1f} GiB"
            f"{how}{note}",
            flush=True,
        )
    elif row.get("status") == "ok" and "sizes" in row:
        sizes = ", ".join(f"{s['width']}x{s['height']} {s.get('s_per_image', float('nan')):.2f}" for s in row["sizes"])
        print(f"{label} {sizes}", flush=True)
    else:
        print(f"{label} {row.get('status')}: {row.get('phase', '')} {str(row.get('error', ''))[:160]}", flush=True)


def _write(path: Path, report: dict[str, Any]) -> None:
    """Atomically: an interrupted run leaves the previous complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.part")
    temporary.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


if __name__ == "__main__":
    raise SystemExit(main())
