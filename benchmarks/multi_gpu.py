"""Two GPUs, both ways: one model split over small cards (dispatch), and one replica per card (throughput).

Each case runs in a fresh process on the full-size checkpoint (1024x1024, bf16, 8 passes):

* ``reference``: ``full_gpu`` on cuda:0, uncapped; its image is the one the others are compared with.
* ``dispatch`` at the cap: every GPU limited to ``--cap-gib`` (12) with ``torch.cuda.set_per_process_memory_fraction``;
  ``Generator()`` (auto) must pick ``multi_gpu`` and run with nothing offloaded to the host.
* ``streamed`` at the cap: ``StreamedOffload`` on one capped card, what a single such card has to do instead.
* ``dispatch_uncapped``: ``multi_gpu`` forced with no cap (whole components on different cards): the cost of
  the split itself against ``reference``.
* ``replicas``: a :class:`GeneratorPool` over cuda:0 and cuda:1 (uncapped); the same prompt list is timed on
  one replica and on both, alternately, in the same process. Images/s of each, and whether the images agree.

Per case: strategy, fallbacks, s/image (median of the images after the first), peaks per device (measured and
predicted), host memory held by the weights, and the image's difference from the reference.

    zimage-turbo make-checkpoint full /tmp/full
    python benchmarks/multi_gpu.py --checkpoint /tmp/full --out benchmarks/results/multi_gpu-2xh200-<date>.json

The JSON gets the environment and the git commit (``ZT_GIT_COMMIT`` or ``git rev-parse``); a PNG is drawn next
to it when matplotlib is installed (else: ``python benchmarks/plot.py FILE.json``). ``tests/gpu/test_multi_gpu.py``
checks such a report (``ZIMAGE_TEST_MULTI_GPU_JSON``) or runs this script itself.
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
ROOT = Path(__file__).resolve().parents[1]


def _cap(gib: float | None) -> None:
    import torch

    if gib is None:
        return
    for index in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), index)


def _difference(a: Any, b: Any) -> dict[str, float]:
    import numpy as np

    x = np.asarray(a).astype(np.int16)
    y = np.asarray(b).astype(np.int16)
    return {"max_abs": float(np.abs(x - y).max()), "mean_abs": float(np.abs(x - y).mean())}


def worker_single(
    checkpoint: str, case: str, strategy: str, device: str | None, cap: float | None, images: int, reference: Path
) -> dict[str, Any]:
    """One Generator: warm-up image, then ``images - 1`` timed ones."""
    _cap(cap)
    from PIL import Image

    from zimage_turbo import Generator, ZImageSettings

    started = time.perf_counter()
    gen = Generator(model=checkpoint, strategy=strategy, device=device, settings=ZImageSettings(progress=False))
    gen.load()
    load_s = time.perf_counter() - started
    results, times = [], []
    for _ in range(images):
        begun = time.perf_counter()
        results.append(gen.generate(PROMPT, seed=SEED))
        times.append(time.perf_counter() - begun)
    last = results[-1]
    homes = getattr(gen.pipeline, "_zimage_turbo_homes", None)
    row: dict[str, Any] = {
        "case": case,
        "requested": strategy,
        "device": device,
        "cap_gib": cap,
        "strategy": last.strategy,
        "vae_tiling": last.vae_tiling,
        "fallbacks": [str(f) for r in results for f in r.fallbacks],
        "load_s": load_s,
        "first_image_s": times[0],
        "s_per_image": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "all_s": times,
        "peak_gib": {k: v / GIB for k, v in last.peak_memory.items() if k.startswith("cuda")},
        "predicted_gib": {k: v / GIB for k, v in last.predicted_peak_memory.items()},
        "host_peak_rss_gib": last.peak_memory["host"] / GIB,
        "host_homes_gib": (homes.host_bytes / GIB) if homes is not None else 0.0,
        "width": last.width,
        "height": last.height,
    }
    if case == "reference":
        results[0].image.save(reference)
    elif reference.is_file():
        row["difference_from_reference"] = _difference(results[0].image, Image.open(reference))
    return row


def worker_replicas(checkpoint: str, devices: list[str], prompts: int, rounds: int, reference: Path) -> dict[str, Any]:
    """One pool over ``devices``; the same prompts timed on its first replica alone and on all of them."""
    from PIL import Image

    from zimage_turbo import GenerationResult, GeneratorPool, ZImageSettings

    texts = [f"{PROMPT}, variation {i}" for i in range(prompts)]
    started = time.perf_counter()
    pool = GeneratorPool(model=checkpoint, devices=devices, settings=ZImageSettings(progress=False), load=True)
    load_s = time.perf_counter() - started
    for replica in pool.replicas:  # warm-up: first image on every card
        replica.generate(PROMPT, seed=SEED)
    one_s: list[float] = []
    all_s: list[float] = []
    alone: list[GenerationResult] = []
    together: list[Any] = []
    for _ in range(rounds):
        begun = time.perf_counter()
        alone = pool.replicas[0].generate_many(texts, seed=SEED)
        one_s.append(time.perf_counter() - begun)
        begun = time.perf_counter()
        together = pool.generate_many(texts, seed=SEED)
        all_s.append(time.perf_counter() - begun)
    failures = [str(o) for o in together if not isinstance(o, GenerationResult)]
    done = [o for o in together if isinstance(o, GenerationResult)]
    per_device: dict[str, int] = {}
    for result in done:
        per_device[result.device] = per_device.get(result.device, 0) + 1
    differences = [
        _difference(a.image, b.image) for a, b in zip(alone, together, strict=True) if isinstance(b, GenerationResult)
    ]
    one_rate = prompts / statistics.median(one_s)
    all_rate = prompts / statistics.median(all_s)
    row: dict[str, Any] = {
        "case": "replicas",
        "devices": pool.devices,
        "strategies": sorted({r.strategy for r in done}),
        "prompts": prompts,
        "rounds": rounds,
        "load_s": load_s,
        "one_replica_s": one_s,
        "all_replicas_s": all_s,
        "one_replica_images_per_s": one_rate,
        "all_replicas_images_per_s": all_rate,
        "speedup": all_rate / one_rate,
        "images_per_device": per_device,
        "failures": failures,
        "max_abs_difference_one_vs_all": max((d["max_abs"] for d in differences), default=None),
        "peak_gib": {k: v / GIB for r in done for k, v in r.peak_memory.items() if k.startswith("cuda")},
    }
    if reference.is_file():
        first = pool.replicas[1 % len(pool.replicas)].generate(PROMPT, seed=SEED)  # the second card's image
        row["difference_from_reference"] = _difference(first.image, Image.open(reference))
    pool.close()
    return row


def run_case(args: list[str], timeout: float = 580) -> dict[str, Any]:
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


def git_commit() -> str:
    if os.environ.get("ZT_GIT_COMMIT"):
        return os.environ["ZT_GIT_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def environment() -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    return {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "gpu_memory_gib": [
            torch.cuda.get_device_properties(i).total_memory / GIB for i in range(torch.cuda.device_count())
        ],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", type=Path, help="JSON file for the whole run (required)")
    parser.add_argument("--cap-gib", type=float, default=12.0, help="per-GPU cap of the dispatch case (default 12)")
    parser.add_argument("--images", type=int, default=4, help="images per single case; the first is the warm-up")
    parser.add_argument("--prompts", type=int, default=16, help="prompts of the replicas case")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of the replicas case (one, then all)")
    parser.add_argument("--devices", default="cuda:0,cuda:1", help="replicas of the throughput case")
    parser.add_argument("--only", nargs="*", default=None, help="run only these cases (names as in the JSON)")
    parser.add_argument("--worker", choices=["single", "replicas"], help=argparse.SUPPRESS)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "single":
        row = worker_single(
            args.checkpoint, args.case, args.strategy, args.device, args.cap, args.images, args.reference
        )
        print("RESULT " + json.dumps(row), flush=True)
        return
    if args.worker == "replicas":
        devices = args.devices.split(",")
        row = worker_replicas(args.checkpoint, devices, args.prompts, args.rounds, args.reference)
        print("RESULT " + json.dumps(row), flush=True)
        return

    if args.out is None:
        parser.error("--out is required")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    reference = args.out.with_name(args.out.stem + "-reference.png")
    common = ["--checkpoint", args.checkpoint, "--reference", str(reference), "--images", str(args.images)]
    cap = str(args.cap_gib)
    single_cases: list[tuple[str, list[str]]] = [
        ("reference", ["--strategy", "full_gpu", "--device", "cuda:0"]),
        ("dispatch", ["--strategy", "auto", "--cap", cap]),
        ("streamed", ["--strategy", "streamed", "--device", "cuda:0", "--cap", cap]),
        ("dispatch_uncapped", ["--strategy", "multi_gpu"]),
    ]
    rows: list[dict[str, Any]] = []
    report = {
        "benchmark": "multi_gpu",
        "size": "1024x1024",
        "steps": 8,
        "prompt": PROMPT,
        "cap_gib": args.cap_gib,
        "environment": environment(),
        "cases": rows,
    }
    for name, extra in single_cases:
        if args.only is not None and name not in args.only:
            continue
        row = run_case([*common, "--worker", "single", "--case", name, *extra])
        row.setdefault("case", name)
        rows.append(row)
        print(json.dumps(row), flush=True)
        _write(args.out, report)  # after every case, so that an interrupted run keeps what it measured
    if args.only is None or "replicas" in args.only:
        row = run_case(
            [
                *common,
                "--worker",
                "replicas",
                "--devices",
                args.devices,
                "--prompts",
                str(args.prompts),
                "--rounds",
                str(args.rounds),
            ],
            timeout=900,
        )
        row.setdefault("case", "replicas")
        rows.append(row)
        print(json.dumps(row), flush=True)
        _write(args.out, report)
    _summary(report)
    try:
        sys.path.insert(0, str(Path(__file__).parent))
        from plot import plot_multi_gpu

        plot_multi_gpu(report, args.out.with_suffix(".png"))
        print(f"wrote {args.out.with_suffix('.png')}")
    except ImportError as exc:
        print(f"no plot ({exc}); draw it later with: python benchmarks/plot.py {args.out}")


def _summary(report: dict[str, Any]) -> None:
    by_case = {row["case"]: row for row in report["cases"]}
    for name, row in by_case.items():
        if "error" in row:
            print(f"{name}: ERROR {row['error'][-300:]}")
        elif name == "replicas":
            print(
                f"replicas {row['devices']}: {row['one_replica_images_per_s']:.3f} -> "
                f"{row['all_replicas_images_per_s']:.3f} images/s ({row['speedup']:.2f}x)"
            )
        else:
            peaks = ", ".join(f"{k} {v:.2f}" for k, v in sorted(row["peak_gib"].items()))
            print(f"{name}: {row['strategy']} {row['s_per_image']:.2f} s/image, peaks GiB {peaks}")


def _write(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
