"""Full-GPU generation: zimage-turbo against plain diffusers, side by side, on the full-size checkpoint.

Each mode runs in a fresh process (so load time and host memory are its own): it loads the model, makes one
warm-up image, then times N images at each step count. Both sides run the same number of transformer passes.

    python benchmarks/full_gpu.py --checkpoint DIR --out benchmarks/results/full_gpu.json [--images 5]
    python benchmarks/plot.py benchmarks/results/full_gpu.json     # bar chart next to the JSON

Modes: ``zimage_turbo`` (Generator, strategy full_gpu), ``diffusers_to_cuda``
(``from_pretrained(dtype=bf16).to("cuda")``) and ``diffusers_device_map``
(``from_pretrained(dtype=bf16, device_map="cuda")``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("zimage_turbo", "diffusers_to_cuda", "diffusers_device_map")
PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"
SIZE = 1024


def worker(mode: str, checkpoint: str, steps_list: list[int], images: int) -> dict[str, Any]:
    """Runs in its own process; returns one mode's measurements."""
    import resource

    import torch

    started = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    if mode == "zimage_turbo":
        from zimage_turbo import Generator, ZImageSettings

        generator = Generator(model=checkpoint, strategy="full_gpu", settings=ZImageSettings(progress=False), load=True)

        def run(steps: int, seed: int) -> None:
            generator.generate(PROMPT, height=SIZE, width=SIZE, steps=steps, seed=seed)

    else:
        from diffusers import ZImagePipeline

        if mode == "diffusers_to_cuda":
            pipe = ZImagePipeline.from_pretrained(checkpoint, dtype=torch.bfloat16).to("cuda")
        else:
            pipe = ZImagePipeline.from_pretrained(checkpoint, dtype=torch.bfloat16, device_map="cuda")
        pipe.set_progress_bar_config(disable=True)

        def run(steps: int, seed: int) -> None:
            pipe(
                PROMPT,
                height=SIZE,
                width=SIZE,
                num_inference_steps=steps,
                guidance_scale=0.0,
                generator=torch.Generator().manual_seed(seed),
            )

    torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    first_started = time.perf_counter()
    run(steps_list[0], 0)
    torch.cuda.synchronize()
    first_image_s = time.perf_counter() - first_started
    per_steps = {}
    for steps in steps_list:
        times = []
        for i in range(images):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(steps, i + 1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        per_steps[str(steps)] = {"median_s": statistics.median(times), "all_s": times}
    return {
        "mode": mode,
        "load_s": load_s,
        "first_image_s": first_image_s,
        "steps": per_steps,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
    }


def environment() -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "gpu_memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_commit": os.environ.get("ZT_GIT_COMMIT", "unknown"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="folder of a full-size checkpoint (or the real weights)")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 9], help="step counts (transformer passes)")
    parser.add_argument("--images", type=int, default=5, help="timed images per step count, after one warm-up")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.checkpoint, args.steps, args.images)), flush=True)
        return

    cases = []
    for mode in args.modes:
        command = [sys.executable, __file__, "--worker", mode, "--checkpoint", args.checkpoint, "--out", "-"]
        command += ["--steps", *map(str, args.steps), "--images", str(args.images)]
        run = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            cases.append({"mode": mode, "error": run.stderr[-2000:]})
            print(f"{mode}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
            continue
        case = json.loads(lines[-1].removeprefix("RESULT "))
        cases.append(case)
        medians = ", ".join(f"{s} steps {v['median_s']:.3f} s" for s, v in case["steps"].items())
        print(
            f"{mode:22s} load {case['load_s']:5.1f} s  first {case['first_image_s']:5.2f} s  {medians}  "
            f"peak {case['peak_allocated_gib']:.1f} GiB  host {case['host_peak_rss_gib']:.1f} GiB",
            flush=True,
        )
    report = {
        "benchmark": "full_gpu",
        "size": SIZE,
        "prompt": PROMPT,
        "images_per_step_count": args.images,
        "environment": environment(),
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
