"""Reading the weights beside the library imports: does it pay, and with how many reading threads?

    python benchmarks/early_read_overlap.py --checkpoint DIR --out benchmarks/results/early-read-overlap-DATE.json

A load imports diffusers and transformers (seconds of Python holding the GIL) and reads the weights into the
GPU (reads and copies that release it). ``early_read.py`` runs the two at once. Threads that often take the GIL
back slow the imports, which are the longer of the two, so the overlap can cost more than it hides. Each case
runs in a fresh process, after ``import torch`` and the CUDA context:

* ``imports``: only the imports a load makes;
* ``reads``: only the reads (every component into ``cuda:0``, as ``full_gpu`` reads them);
* ``both``: the reads started on the early-read thread, then the imports; when each ended.

``both`` runs for each ``--threads`` and ``--chunk-mib`` (the reading threads and their staging chunk size).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def worker(mode: str, checkpoint: str, threads: int, chunk_mib: int) -> dict[str, Any]:
    import torch

    torch.empty(1, device="cuda")
    from zimage_turbo import weights
    from zimage_turbo.early_read import EarlyReads
    from zimage_turbo.layout import check_pipeline_dir
    from zimage_turbo.loader import _FILL_ORDER, _entries, import_model_libraries

    weights.READ_THREADS = threads
    weights.STAGING_CHUNK_BYTES = chunk_mib * 2**20
    layout = check_pipeline_dir(checkpoint)
    device = torch.device("cuda", 0)
    jobs = [(name, _entries(layout, name), device) for name in _FILL_ORDER]
    read_ends: list[float] = []

    class Ended(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            read_ends.append(time.perf_counter())

    reader_log = logging.getLogger("zimage_turbo.early_read")
    reader_log.setLevel(logging.DEBUG)
    reader_log.addHandler(Ended())
    result: dict[str, Any] = {"mode": mode, "threads": threads, "chunk_mib": chunk_mib}
    start = time.perf_counter()
    early = EarlyReads(jobs if mode != "imports" else [], torch.bfloat16)
    if mode != "reads":
        import_model_libraries()
        result["imports_end_s"] = time.perf_counter() - start
    for name, _, _ in jobs:
        early.take(name)
    early.close()
    torch.cuda.synchronize()
    if mode != "imports":
        result["reads_end_s"] = read_ends[-1] - start
    result["all_end_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--chunk-mib", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        mode, threads, chunk = args.worker
        print("RESULT " + json.dumps(worker(mode, args.checkpoint, int(threads), int(chunk))), flush=True)
        return 0
    cases = [("imports", 8, 16), ("reads", 8, 16)]
    cases += [("both", threads, chunk) for threads in args.threads for chunk in args.chunk_mib]
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for mode, threads, chunk in cases:
            command = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--out", str(args.out)]
            done = subprocess.run(
                [*command, "--worker", mode, str(threads), str(chunk)], capture_output=True, text=True, check=False
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            run = {"round": round_, **json.loads(lines[-1].removeprefix("RESULT "))}
            runs.append(run)
            print(json.dumps(run), flush=True)
    medians: dict[str, dict[str, float]] = {}
    for mode, threads, chunk in cases:
        label = mode if mode != "both" else f"both threads={threads} chunk={chunk}MiB"
        mine = [r for r in runs if (r["mode"], r["threads"], r["chunk_mib"]) == (mode, threads, chunk)]
        keys = [key for key in ("imports_end_s", "reads_end_s", "all_end_s") if key in mine[0]]
        medians[label] = {key: statistics.median(r[key] for r in mine) for key in keys}
    report = {
        "benchmark": "early_read_overlap",
        "checkpoint": Path(args.checkpoint).name,
        "git_commit": os.environ.get("ZT_GIT_COMMIT", "unknown"),
        "runs": runs,
        "medians": medians,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for label, values in medians.items():
        print(f"{label:34s} " + "  ".join(f"{key} {value:.2f}" for key, value in values.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
