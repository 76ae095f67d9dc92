"""Cold start: from process start to the first image, phase by phase, ours beside plain diffusers.

    python benchmarks/cold_start.py --checkpoint DIR --out benchmarks/results/cold_start-h200-DATE.json

Build the checkpoint like the published one (``zimage-turbo make-checkpoint full DIR --published-layout``: the
transformer in float32 shards) to measure what a first load of the real weights reads. Each case runs in a
fresh process and marks the seconds since that process started after each step: Python running, ``import
torch``, the CUDA context, importing the libraries, loading and placing the weights, the first and the second
image (ours also reports the first image's phases: encode, denoise, decode). Cases:

* ``diffusers``: ``ZImagePipeline.from_pretrained(dtype=bfloat16, device_map="cuda")`` and one call, as the
  scripts people copy do;
* ``ours``: ``Generator(...).generate(...)`` reading the source (``converted_copy="off"``);
* ``ours_converted``: the same reading the converted copy, written beforehand by ``zimage-turbo convert``
  (its time is reported as ``convert_s``; seconds when a sound copy exists already);
* ``ours_compiled``: ``ours_converted`` with ``compile="on"`` (the transformer's blocks compiled before the first
  image; the text encoder and the VAE decoder wait until the work pays for them, as diffusers compiles only the
  blocks);
* ``diffusers_compiled``: ``diffusers`` with ``transformer.compile_repeated_blocks(fullgraph=True)``.

The compiled cases keep Inductor's kernels in the cache folder (ours where the library puts them, diffusers' in
``inductor-diffusers`` beside it), so the first round of a run with ``--clear-kernel-cache`` compiles from an
empty cache and later rounds from a warm one, as a second process on the same machine does; each run records
which (``kernel_cache_warm``), and the medians keep the two apart.

The cases run in turn, ``--rounds`` times (the first round also brings the files into the page cache);
medians are reported per case. With ``--drop-caches`` the page cache is dropped before each case where the
machine allows it (root, ``/proc/sys/vm/drop_caches`` writable); the report says whether it could.

Where the site-packages cannot be written, or ``PYTHONDONTWRITEBYTECODE`` is set, set ``PYTHONPYCACHEPREFIX``
to a writable folder and unset ``PYTHONDONTWRITEBYTECODE``: otherwise every start compiles torch,
transformers and diffusers from source again (about 8 s). The report records which it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

_START = psutil.Process().create_time()
CASES = ("diffusers", "ours", "ours_converted", "ours_compiled", "diffusers_compiled")
COMPILED = ("ours_compiled", "diffusers_compiled")
PROMPT = "a red fox in the snow"


def since_start() -> float:
    return time.time() - _START


def worker(case: str, checkpoint: str, cache_dir: str, size: int, profile: bool = False) -> dict[str, Any]:
    """One case in this (fresh) process: the marks, and ours' phases of the first image and the library's log
    lines with their times (with ``profile``, also where the main thread spent the load and the first image)."""
    marks: list[tuple[str, float]] = [("python running", since_start())]
    # ours keeps the library's log lines with their times (cheap); the profiler only when asked (it slows the run)
    log = _keep_log() if case.startswith("ours") else []
    profiler = _profile_main_thread() if profile else None
    kernels = kernel_cache(case, cache_dir)
    if case == "diffusers_compiled":
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(kernels)
    else:
        # the library keeps its kernels in its cache folder unless someone chose another; a user's process has
        # none set. (Until 2026-11-29 the library took torch's own default, which importing torch._dynamo sets,
        # for a choice and wrote there: ours' warm rounds were then reported cold.)
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    warm = kernels.is_dir() and any(path.is_file() for path in kernels.rglob("*"))

    def mark(step: str) -> None:
        marks.append((step, since_start()))

    import torch

    mark("import torch")
    torch.empty(1, device="cuda")
    mark("CUDA context")
    phases: dict[str, Any] = {}
    if case in ("diffusers", "diffusers_compiled"):
        import diffusers  # noqa: F401
        import transformers  # noqa: F401

        mark("import libraries")
        from diffusers import ZImagePipeline

        pipe = ZImagePipeline.from_pretrained(checkpoint, dtype=torch.bfloat16, device_map="cuda")
        pipe.set_progress_bar_config(disable=True)
        if case == "diffusers_compiled":
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
        torch.cuda.synchronize()
        mark("weights loaded and placed")

        def image(seed: int) -> None:
            pipe(
                PROMPT,
                height=size,
                width=size,
                num_inference_steps=8,
                guidance_scale=0.0,
                generator=torch.Generator().manual_seed(seed),
            )

    else:
        import zimage_turbo  # light: diffusers and transformers come with the first load, as in an app

        mark("import libraries")
        converted = "off" if case == "ours" else "auto"
        settings = zimage_turbo.ZImageSettings(
            progress=False,
            source="local",
            cache_dir=Path(cache_dir),
            converted_copy=converted,
            compile="on" if case == "ours_compiled" else "off",
        )
        generator = zimage_turbo.Generator(model=checkpoint, settings=settings).load()
        torch.cuda.synchronize()
        assert generator.model is not None
        phases["read_from"] = generator.model.source
        mark("weights loaded and placed")

        def image(seed: int) -> None:
            result = generator.generate(PROMPT, height=size, width=size, seed=seed)
            phases.setdefault("first_image", result.timings.to_dict())

    image(1)
    torch.cuda.synchronize()
    mark("first image")
    image(2)
    torch.cuda.synchronize()
    mark("second image")
    result = {"case": case, "marks": dict(marks), **phases, "host_max_rss_gib": _max_rss_gib()}
    if log:
        result["log"] = log
    if profiler is not None:
        profiler.disable()
        result["profile"] = _top_calls(profiler)
    return {**result, "kernel_cache_warm": warm} if case in COMPILED else result


def _keep_log() -> list[str]:
    """The library's log lines (debug and up) from now on, each with the seconds since the process started."""
    import logging

    log: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log.append(f"{since_start():7.2f} {record.name}: {record.getMessage()}")

    library = logging.getLogger("zimage_turbo")
    library.setLevel(logging.DEBUG)  # the loader says at debug what building and filling each component took
    library.addHandler(Keep())
    return log


def _profile_main_thread() -> Any:
    """A profiler of this thread from now on (the imports, the load and the images: the reading threads show as
    waits)."""
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _top_calls(profiler: Any, count: int = 45) -> list[str]:
    """The calls that took the most time, their callees included, as pstats prints them."""
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(count)
    return [line for line in text.getvalue().splitlines() if line.strip()]


def kernel_cache(case: str, cache_dir: str) -> Path:
    """Where the compiled case's Inductor kernels are kept (ours: where the library keeps them)."""
    if case == "diffusers_compiled":
        return Path(cache_dir) / "inductor-diffusers"
    return Path(cache_dir) / "torch-compile" / "inductor"


def _max_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def drop_page_cache() -> bool:
    """Drop the page cache if this machine lets us (root); whether it did."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--cache-dir", default=None, help="the library's cache for the converted copy (a temp dir)")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before each case")
    parser.add_argument(
        "--clear-kernel-cache", action="store_true", help="empty the compiled cases' kernel caches first"
    )
    parser.add_argument("--profile", action="store_true", help="ours: keep a profile of the main thread")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or str(args.out.parent / "cold-start-cache")
    if args.worker:
        watched = args.profile and args.worker.startswith("ours")
        result = worker(args.worker, args.checkpoint, cache_dir, args.size, profile=watched)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch

    report: dict[str, Any] = {
        "benchmark": "cold_start",
        "gpu": torch.cuda.get_device_name(0),
        "checkpoint": Path(args.checkpoint).name,
        "git_commit": os.environ.get("ZT_GIT_COMMIT", "unknown"),
        "size": args.size,
        "steps": 8,
        "bytecode": {"written": not sys.dont_write_bytecode, "pycache_prefix_set": sys.pycache_prefix is not None},
        "runs": [],
    }
    if args.clear_kernel_cache:
        for case in COMPILED:
            shutil.rmtree(kernel_cache(case, cache_dir), ignore_errors=True)
        (Path(cache_dir) / "torch-compile" / "zimage-turbo-compile-times.json").unlink(missing_ok=True)
    if any(case != "ours" and case.startswith("ours") for case in args.cases):
        started = time.perf_counter()
        command = [sys.executable, "-m", "zimage_turbo", "-q", "convert", "--model", args.checkpoint]
        subprocess.run([*command, "--cache-dir", cache_dir], check=True)  # kept when a sound one exists
        report["convert_s"] = time.perf_counter() - started
    dropped: list[bool] = []
    for round_number in range(args.rounds):
        for case in args.cases:
            if args.drop_caches:
                dropped.append(drop_page_cache())
            command = [sys.executable, __file__, "--worker", case, "--checkpoint", args.checkpoint]
            command += ["--out", str(args.out), "--cache-dir", cache_dir, "--size", str(args.size)]
            command += ["--profile"] if args.profile else []
            run = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode != 0 or not lines:
                report["runs"].append({"case": case, "round": round_number, "error": run.stderr[-3000:]})
                print(f"{case}: failed\n{run.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            result = {"round": round_number, **json.loads(lines[-1].removeprefix("RESULT "))}
            report["runs"].append(result)
            print(json.dumps(result), flush=True)
    report["page_cache_dropped"] = bool(dropped) and all(dropped) if args.drop_caches else "not asked"
    report["medians"] = _medians(report["runs"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(report["medians"], indent=1))
    return 0


def _medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per case, the median of each mark over its rounds; a compiled case's runs from an empty and from a warm
    kernel cache apart (``ours_compiled (warm kernel cache)``)."""
    medians: dict[str, dict[str, float]] = {}
    for case in CASES:
        for warm in (False, True) if case in COMPILED else (None,):
            name = f"{case} (warm kernel cache)" if warm else case
            marks = [
                run["marks"]
                for run in runs
                if run.get("case") == case and "marks" in run and (warm is None or run["kernel_cache_warm"] is warm)
            ]
            if marks:
                medians[name] = {step: statistics.median(m[step] for m in marks) for step in marks[0]}
    return medians


if __name__ == "__main__":
    raise SystemExit(main())
