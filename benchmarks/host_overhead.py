"""Host work per image outside the GPU kernels, on a CPU (no GPU needed).

    python benchmarks/host_overhead.py --out benchmarks/results/host_overhead-cpu-DATE.json

Two measurements:

* **Module walks on the full-size model.** The full pipeline is built on the ``meta`` device (every module and
  parameter object, no weights), and we time what walks all of it: diffusers' ``pipe._execution_device`` and
  the speed-ups' check that a part runs unhooked (:func:`zimage_turbo.speedups.compile.runs_unhooked_on`). On a
  GPU such host time adds to the image whenever the GPU is waiting for the host.
* **Ours against plain diffusers on the tiny checkpoint**, alternating, same seed and passes: the whole image is
  host-bound here, so what our wrapper adds shows directly. Also counted: garbage collections per image.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"


def _ms(action: Callable[[], object], repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        action()
    return (time.perf_counter() - started) / repeats * 1e3


def module_walks(repeats: int) -> dict[str, Any]:
    from zimage_turbo.checkpoints import PRESETS, _build_pipeline
    from zimage_turbo.speedups import compile as compiling

    meta = torch.device("meta")
    pipe = _build_pipeline(PRESETS["full"], 0, meta)
    walks: dict[str, Any] = {
        "modules": {
            name: sum(1 for _ in getattr(pipe, name).modules()) for name in ("transformer", "text_encoder", "vae")
        },
        "execution_device_ms": _ms(lambda: pipe._execution_device, repeats),
    }
    for part in compiling.COMPILE_PARTS:
        walks[f"runs_unhooked_on_{part.name}_ms"] = _ms(
            lambda part=part: compiling.runs_unhooked_on(part.modules(pipe), meta), repeats
        )
    return walks


def ours_against_diffusers(images: int) -> dict[str, Any]:
    from diffusers import ZImagePipeline

    from zimage_turbo import Generator, ZImageSettings, make_checkpoint

    folder = Path(tempfile.mkdtemp(prefix="zimage-turbo-host-overhead-")) / "tiny"
    make_checkpoint("tiny", folder)
    settings = ZImageSettings(model=str(folder), source="local", progress=False, compile="off")
    ours = Generator(settings=settings, strategy="cpu").load()
    pipe = ZImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    size = {"height": 256, "width": 256}

    def run_ours() -> None:
        ours.generate(PROMPT, seed=1, steps=8, **size)

    def run_diffusers() -> None:
        generator = torch.Generator("cpu").manual_seed(1)
        pipe(PROMPT, num_inference_steps=8, guidance_scale=0.0, generator=generator, **size)

    sides = {"ours": run_ours, "diffusers": run_diffusers}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    collections: dict[str, int] = dict.fromkeys(sides, 0)
    current = ["ours"]

    def count(phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            collections[current[0]] += 1

    for run in sides.values():  # warm-up
        run()
        run()
    gc.callbacks.append(count)
    try:
        for _ in range(images):
            for name, run in sides.items():
                current[0] = name
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
    finally:
        gc.callbacks.remove(count)
    return {
        name: {
            "median_ms": statistics.median(values) * 1e3,
            "all_ms": [v * 1e3 for v in values],
            "gc_collections": collections[name],
        }
        for name, values in seconds.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=20, help="timings of each walk")
    parser.add_argument("--images", type=int, default=15, help="images per side, alternating")
    args = parser.parse_args(argv)
    report = {
        "benchmark": "host_overhead",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": os.environ.get("ZT_GIT_COMMIT", "unknown"),
        "torch": torch.__version__,
        "module_walks_full_size": module_walks(args.repeats),
        "tiny_checkpoint_cpu": ours_against_diffusers(args.images),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report["module_walks_full_size"].items()}, indent=1))
    for name, side in report["tiny_checkpoint_cpu"].items():
        print(f"{name}: {side['median_ms']:.1f} ms per image, {side['gc_collections']} collections")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
