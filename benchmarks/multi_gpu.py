"""Several GPUs, every way: one model split over capped cards, streaming on each card, a pool, Ray.

Each case runs in a fresh process on the full-size checkpoint (1024x1024, bf16, 8 passes), seeing only the GPUs
it names (``CUDA_VISIBLE_DEVICES``), each capped with ``torch.cuda.set_per_process_memory_fraction``:

part ``placements`` (one model):

* ``reference``: ``full_gpu`` on one uncapped card; every other image is compared with its image.
* ``reference_tiled``: the same with a tiled decode (capped at 21 GiB); images decoded in tiles are compared
  with it too.
* ``split_uncapped``: ``multi_gpu`` forced on two uncapped cards (whole components on different cards).
* ``auto_2x12``, ``auto_2x8``, ``auto_3x8``, ``auto_4x6``: ``Generator()`` on cards capped so; it must pick a
  placement that uses several cards (``multi_gpu``, or ``multi_gpu_hybrid`` with the text encoder streamed).
* ``split_24_12``: ``multi_gpu`` forced on cards capped at 24 and 12 GiB (``auto`` would run full_gpu on the
  24 GiB card).
* ``ladder_2x8``: ``multi_gpu`` forced where it cannot fit (2x8 GiB): the ladder must move to the next rung on
  the same weights.
* ``streamed_cuda<k>``: ``StreamedOffload(device="cuda:k")`` on every card in turn, all cards visible and capped
  at 8 GiB, the Generator not restricted to a card (as ``auto`` runs it): each card must stream as fast as the
  first.

part ``throughput`` (many images):

* ``pool``: ``GeneratorPool(devices="all")`` over every card, uncapped; the same prompts timed on its first
  replica alone and on all, alternately; the images of both must agree.
* ``pool_capped``: the same with the last card capped at 8 GiB: it joins through a streamed replica.
* ``ray``: ``zimage-turbo batch prompts.jsonl --out DIR --ray local`` (one actor per GPU), images/s read from
  the manifest as lines arrive; then the same batch killed half-way (the whole process group, SIGKILL) and run
  again: every image once in the manifest, each equal to the uninterrupted run's.

Per case: strategy, fallbacks, s/image (median of the images after the first), peaks per card (measured and
predicted), host RSS, host RAM held by the weights, where the model went, and the image's difference from the
reference.

    zimage-turbo make-checkpoint full /tmp/full
    python benchmarks/multi_gpu.py --checkpoint /tmp/full --out benchmarks/results/multi_gpu-4xh200-<date>.json

The JSON gets the environment and the git commit (``ZT_GIT_COMMIT`` or ``git rev-parse``) and is rewritten after
every case (``--part`` adds to an existing file). ``tests/gpu/test_multi_gpu.py`` checks such a report
(``ZIMAGE_TEST_MULTI_GPU_JSON``) or runs this script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"
SEED = 7
GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]


def _cap(caps: list[float | None]) -> None:
    """Cap visible card ``i`` at ``caps[i]`` GiB (None: uncapped)."""
    import torch

    for index, gib in enumerate(caps):
        if gib is not None:
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), index)


def _caps(text: str) -> list[float | None]:
    return [None if part in ("", "-") else float(part) for part in text.split(",")] if text else []


def _difference(a: Any, b: Any) -> dict[str, float]:
    import numpy as np

    x = np.asarray(a).astype(np.int16)
    y = np.asarray(b).astype(np.int16)
    return {"max_abs": float(np.abs(x - y).max()), "mean_abs": float(np.abs(x - y).mean())}


def _strategy(name: str, on: str | None) -> Any:
    if on is None or name == "auto":
        return name
    from zimage_turbo.strategies import STRATEGIES

    return STRATEGIES[name](device=on)  # type: ignore[call-arg]


def _placement(gen: Any) -> dict[str, Any]:
    """Where the model went: for a split, the main card, the text encoder's and the blocks per card."""
    placed = getattr(gen.strategy, "placed", None)
    if placed is None:
        return {}
    per_card: dict[str, int] = {}
    for gpu in placed.transformer_blocks:
        per_card[f"cuda:{gpu}"] = per_card.get(f"cuda:{gpu}", 0) + 1
    return {
        "main": f"cuda:{placed.main}",
        "text_encoder": f"cuda:{placed.text_encoder_main}",
        "text_encoder_streamed": placed.text_encoder_streamed,
        "transformer_blocks_per_card": per_card,
        "predicted_peaks_gib": {f"cuda:{k}": v / GIB for k, v in placed.peaks.items()},
    }


def worker_single(args: argparse.Namespace) -> dict[str, Any]:
    """One Generator: warm-up image, then ``images - 1`` timed ones."""
    _cap(_caps(args.caps))
    import torch
    from PIL import Image

    from zimage_turbo import Generator, ZImageSettings

    started = time.perf_counter()
    gen = Generator(
        model=args.checkpoint,
        strategy=_strategy(args.strategy, args.on),
        device=args.device,
        settings=ZImageSettings(progress=False),
    )
    gen.load()
    load_s = time.perf_counter() - started
    results, times = [], []
    for _ in range(args.images):
        begun = time.perf_counter()
        results.append(gen.generate(PROMPT, seed=SEED))
        times.append(time.perf_counter() - begun)
    last = results[-1]
    homes = getattr(gen.pipeline, "_zimage_turbo_homes", None)
    row: dict[str, Any] = {
        "case": args.case,
        "requested": args.strategy + (f" on {args.on}" if args.on else ""),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "caps_gib": _caps(args.caps),
        "strategy": last.strategy,
        "vae_tiling": last.vae_tiling,
        "device": last.device,
        "fallbacks": [str(f) for r in results for f in r.fallbacks],
        "placement": _placement(gen),
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
        "timings": {"encode": last.timings.encode, "denoise": last.timings.denoise, "decode": last.timings.decode},
        "gpus_visible": torch.cuda.device_count(),
    }
    reference = Path(args.reference)
    tiled = reference.with_name(reference.stem + "-tiled.png")
    if args.case in ("reference", "reference_tiled"):
        results[0].image.save(tiled if last.vae_tiling else reference)
    if reference.is_file():
        row["difference_from_reference"] = _difference(results[0].image, Image.open(reference))
    if last.vae_tiling and tiled.is_file():  # the same decode, tile for tile
        row["difference_from_tiled_reference"] = _difference(results[0].image, Image.open(tiled))
    gen.close()
    return row


def worker_pool(args: argparse.Namespace) -> dict[str, Any]:
    """A pool over every visible card; the same prompts timed on its first replica alone and on all of them."""
    _cap(_caps(args.caps))
    from PIL import Image

    from zimage_turbo import GenerationResult, GeneratorPool, ZImageSettings

    texts = [f"{PROMPT}, variation {i}" for i in range(args.prompts)]
    started = time.perf_counter()
    pool = GeneratorPool(model=args.checkpoint, settings=ZImageSettings(progress=False), load=True)
    load_s = time.perf_counter() - started
    warm = {}
    for replica in pool.replicas:  # warm-up: first image on every card
        warm[str(replica.device)] = replica.generate(PROMPT, seed=SEED)
    one_s: list[float] = []
    all_s: list[float] = []
    alone: list[GenerationResult] = []
    together: list[Any] = []
    for _ in range(args.rounds):
        if not args.skip_alone:
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
    all_rate = args.prompts / statistics.median(all_s)
    row: dict[str, Any] = {
        "case": args.case,
        "caps_gib": _caps(args.caps),
        "devices": pool.devices,
        "strategies": {str(r.device): warm[str(r.device)].strategy for r in pool.replicas},
        "prompts": args.prompts,
        "rounds": args.rounds,
        "load_s": load_s,
        "all_replicas_s": all_s,
        "all_replicas_images_per_s": all_rate,
        "images_per_device": per_device,
        "failures": failures,
        "peak_gib": {k: v / GIB for r in done for k, v in r.peak_memory.items() if k.startswith("cuda")},
        "host_peak_rss_gib": max(r.peak_memory["host"] for r in done) / GIB if done else None,
    }
    if alone:
        one_rate = args.prompts / statistics.median(one_s)
        differences = [_difference(a.image, b.image) for a, b in zip(alone, done, strict=True)]
        row.update(
            one_replica_s=one_s,
            one_replica_images_per_s=one_rate,
            speedup=all_rate / one_rate,
            max_abs_difference_one_vs_all=max((d["max_abs"] for d in differences), default=None),
        )
    reference = Path(args.reference)
    if reference.is_file():
        row["difference_from_reference"] = {
            device: _difference(result.image, Image.open(reference)) for device, result in warm.items()
        }
    pool.close()
    return row


def worker_ray(args: argparse.Namespace) -> dict[str, Any]:
    """The batch CLI on a local Ray: timed uninterrupted, then killed half-way and resumed."""
    from PIL import Image

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{PROMPT}, view {i}"}) + "\n" for i in range(args.prompts)))
    whole, resumed = work / "whole", work / "resumed"
    command = [sys.executable, "-m", "zimage_turbo", "batch", str(prompts), "--ray", "local", "-q"]
    command += ["--model", args.checkpoint, "--seed", str(SEED)]

    arrivals, whole_s, code = _run_batch([*command, "--out", str(whole)], whole / "manifest.jsonl")
    row: dict[str, Any] = {"case": "ray", "prompts": args.prompts, "whole_exit": code, "whole_wall_s": whole_s}
    lines = _manifest(whole / "manifest.jsonl")
    actors = len({line.get("worker") for line in lines}) or 1
    if len(arrivals) > actors:
        # steady state: from the moment every actor has made its first image to the last image
        row["images_per_s"] = (len(arrivals) - actors) / (arrivals[-1] - arrivals[actors - 1])
    row["actors"] = actors
    row["strategies"] = sorted({line["strategy"] for line in lines})
    row["devices_seen"] = sorted({str(line.get("worker")) for line in lines})

    half = args.prompts // 2
    _, _, killed_code = _run_batch([*command, "--out", str(resumed)], resumed / "manifest.jsonl", kill_at=half)
    before = len(_manifest(resumed / "manifest.jsonl"))
    _, _, again_code = _run_batch([*command, "--out", str(resumed)], resumed / "manifest.jsonl")
    after = _manifest(resumed / "manifest.jsonl")
    ids = [line["id"] for line in after]
    differences = [
        _difference(Image.open(resumed / line["file"]), Image.open(whole / line["file"]))["max_abs"] for line in after
    ]
    row.update(
        killed_after_lines=before,
        killed_exit=killed_code,
        resumed_exit=again_code,
        manifest_lines=len(after),
        manifest_ids_unique=len(set(ids)) == len(ids) == args.prompts,
        max_abs_difference_resumed_vs_whole=max(differences, default=None),
    )
    return row


def _manifest(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_batch(command: list[str], manifest: Path, kill_at: int | None = None) -> tuple[list[float], float, int]:
    """Run the batch command; the seconds at which each manifest line appeared, the wall time, the exit code.
    With ``kill_at``, SIGKILL the command's whole process group (Ray's own processes too) once that many lines
    are written."""
    started = time.perf_counter()
    process = subprocess.Popen(command, start_new_session=True)
    arrivals: list[float] = []
    while process.poll() is None:
        count = len(_manifest(manifest)) if manifest.is_file() else 0
        arrivals += [time.perf_counter() - started] * (count - len(arrivals))
        if kill_at is not None and count >= kill_at:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            _stop_ray()
            break
        time.sleep(0.1)
    count = len(_manifest(manifest))
    arrivals += [time.perf_counter() - started] * (count - len(arrivals))
    return arrivals, time.perf_counter() - started, process.returncode


def _stop_ray() -> None:
    """Whatever of a killed local Ray outlived its process group (workers start sessions of their own)."""
    stop = "from ray.scripts.scripts import main; main()"
    subprocess.run([sys.executable, "-c", stop, "stop", "--force"], capture_output=True, timeout=120, check=False)
    time.sleep(2)


def run_case(args: list[str], visible: str | None, timeout: float) -> dict[str, Any]:
    """Run one case in a fresh process seeing ``visible`` GPUs; returns its JSON (or {"error": ...})."""
    env = dict(os.environ)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    command = [sys.executable, __file__, *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout)[-4000:]}
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


def placement_cases(gpus: int) -> list[tuple[str, int, list[str]]]:
    """(name, GPUs it needs, worker arguments) of the one-model cases."""
    cases = [
        ("reference", 1, ["--strategy", "full_gpu", "--device", "cuda:0"]),
        # full_gpu with a tiled decode (a 21 GiB cap leaves no room for the whole decode): what tiled cases match
        ("reference_tiled", 1, ["--strategy", "full_gpu", "--device", "cuda:0", "--caps", "21"]),
        ("split_uncapped", 2, ["--strategy", "multi_gpu"]),
        ("auto_2x12", 2, ["--caps", "12,12"]),
        ("auto_2x8", 2, ["--caps", "8,8"]),
        ("split_24_12", 2, ["--strategy", "multi_gpu", "--caps", "24,12"]),
        ("ladder_2x8", 2, ["--strategy", "multi_gpu", "--caps", "8,8"]),
        ("auto_3x8", 3, ["--caps", "8,8,8"]),
        ("auto_4x6", 4, ["--caps", "6,6,6,6"]),
    ]
    eights = ",".join(["8"] * gpus)
    cases += [
        (f"streamed_cuda{k}", 1, ["--strategy", "streamed", "--on", f"cuda:{k}", "--caps", eights]) for k in range(gpus)
    ]
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", type=Path, help="JSON file for the whole run (required)")
    parser.add_argument("--part", choices=["placements", "throughput", "all"], default="all")
    parser.add_argument("--images", type=int, default=4, help="images per single case; the first is the warm-up")
    parser.add_argument("--prompts", type=int, default=16, help="prompts of the pool and Ray cases")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of the pool case (one, then all)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these cases (names as in the JSON)")
    parser.add_argument("--worker", choices=["single", "pool", "ray"], help=argparse.SUPPRESS)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--on", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--caps", default="", help=argparse.SUPPRESS)
    parser.add_argument("--skip-alone", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "zimage-multi-gpu-ray",
        help="scratch folder of the Ray case (emptied first; its images stay out of --out's folder)",
    )
    args = parser.parse_args()

    workers = {"single": worker_single, "pool": worker_pool, "ray": worker_ray}
    if args.worker is not None:
        print("RESULT " + json.dumps(workers[args.worker](args)), flush=True)
        return

    if args.out is None:
        parser.error("--out is required")
    import torch

    gpus = torch.cuda.device_count()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    reference = args.out.with_name(args.out.stem + "-reference.png")
    common = ["--checkpoint", args.checkpoint, "--reference", str(reference)]
    report: dict[str, Any] = {
        "benchmark": "multi_gpu",
        "size": "1024x1024",
        "steps": 8,
        "prompt": PROMPT,
        "environment": environment(),
        "cases": [],
    }
    if args.out.is_file():  # another part of the same run: keep what it measured
        report["cases"] = [c for c in json.loads(args.out.read_text())["cases"] if "error" not in c]
    done = {c["case"] for c in report["cases"]}

    def record(name: str, row: dict[str, Any]) -> None:
        row.setdefault("case", name)
        row["git_commit"] = report["environment"]["git_commit"]  # parts of one report may run at other commits
        report["cases"] = [c for c in report["cases"] if c["case"] != name] + [row]
        print(json.dumps(row), flush=True)
        _write(args.out, report)  # after every case, so that an interrupted run keeps what it measured

    def wanted(name: str) -> bool:
        return args.only is None or name in args.only

    visible = lambda n: ",".join(str(i) for i in range(n))  # noqa: E731
    if args.part in ("placements", "all"):
        for name, needs, extra in placement_cases(gpus):
            if not wanted(name) or needs > gpus:
                continue
            if name == "reference" and "reference" in done and reference.is_file():
                continue
            worker = [*common, "--worker", "single", "--case", name, "--images", str(args.images), *extra]
            record(name, run_case(worker, visible(gpus if name.startswith("streamed") else needs), timeout=300))
    if args.part in ("throughput", "all") and gpus >= 1:
        pool = [*common, "--worker", "pool", "--prompts", str(args.prompts), "--rounds", str(args.rounds)]
        if wanted("pool") and gpus >= 2:
            record("pool", run_case([*pool, "--case", "pool"], visible(gpus), timeout=560))
        if wanted("pool_capped") and gpus >= 2:
            capped = ",".join(["-"] * (gpus - 1) + ["8"])
            extra = ["--case", "pool_capped", f"--caps={capped}", "--skip-alone", "--rounds", "1"]
            record("pool_capped", run_case([*pool, *extra], visible(gpus), timeout=400))
        if wanted("ray"):
            shutil.rmtree(args.workdir, ignore_errors=True)  # a batch left from an earlier run would be resumed
            ray = [*common, "--worker", "ray", "--prompts", str(args.prompts), "--workdir", str(args.workdir)]
            record("ray", run_case(ray, visible(gpus), timeout=560))
    _summary(report)


def _summary(report: dict[str, Any]) -> None:
    by_case = {row["case"]: row for row in report["cases"]}
    one = by_case.get("pool", {}).get("one_replica_images_per_s")
    for name, row in by_case.items():
        if "error" in row:
            print(f"{name}: ERROR {row['error'][-600:]}")
        elif name in ("pool", "pool_capped"):
            rate = row["all_replicas_images_per_s"]
            speedup = f" ({rate / one:.2f}x one replica)" if one else ""
            print(f"{name} {row['strategies']}: {rate:.3f} images/s{speedup}, per card {row['images_per_device']}")
        elif name == "ray":
            rate = row.get("images_per_s")
            speedup = f" ({rate / one:.2f}x one GPU)" if rate and one else ""
            print(
                f"ray: {rate} images/s{speedup}; killed at {row['killed_after_lines']}, resumed to "
                f"{row['manifest_lines']} lines, unique {row['manifest_ids_unique']}, "
                f"max diff {row['max_abs_difference_resumed_vs_whole']}"
            )
        else:
            peaks = ", ".join(f"{k} {v:.2f}" for k, v in sorted(row["peak_gib"].items()) if v > 0.01)
            diff = row.get("difference_from_reference", {}).get("max_abs")
            print(
                f"{name}: {row['strategy']} {row['s_per_image']:.3f} s/image, peaks GiB {peaks}, "
                f"host {row['host_homes_gib']:.1f} GiB, diff {diff}, fallbacks {len(row['fallbacks'])}"
            )


def _write(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
