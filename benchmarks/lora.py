"""LoRA: per-image cost, load + first image, unload, host memory; zimage-turbo beside plain diffusers.

A rank-32 LoRA on every attention and feed-forward linear of the transformer (built here from the
checkpoint's config, random, bf16, diffusers' layout) is used under each mode. Each mode runs in a fresh
process: load, one warm-up image, N plain images, then the LoRA is loaded and N images are timed with it.
Both sides run the same number of transformer passes, 1024x1024.

    python benchmarks/lora.py --checkpoint DIR --out benchmarks/results/lora.json [--images 3]

Modes: ``ours:full_gpu``, ``ours:hybrid@16`` and ``ours:streamed@4`` (a strategy at a GiB cap set with
``torch.cuda.set_per_process_memory_fraction``), ``diffusers:to_cuda`` (``load_lora_weights`` unfused, then
``fuse_lora``), ``diffusers:group_offload@4`` (block-level group offload with streams; the LoRA is loaded
before the offload is enabled, as diffusers' docs ask) and ``diffusers:group_offload_plain@4`` (the same
without a LoRA). Images are written next to the JSON so that the parent compares them across modes.
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

MODES = (
    "ours:full_gpu",
    "ours:hybrid@16",
    "ours:streamed@4",
    "diffusers:to_cuda",
    "diffusers:group_offload_plain@4",
    "diffusers:group_offload@4",
)
PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"
SIZE = 1024
RANK = 32
TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1")
TARGETS += ("feed_forward.w2", "feed_forward.w3")


def make_lora(checkpoint: str, path: Path) -> int:
    """A random rank-32 LoRA on every attention and feed-forward linear; returns its bytes."""
    import torch
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file

    config = ZImageTransformer2DModel.load_config(Path(checkpoint) / "transformer")
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(config)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            down = torch.randn(RANK, module.in_features, generator=generator) / module.in_features**0.5
            up = torch.randn(module.out_features, RANK, generator=generator) * 0.02
            tensors[f"transformer.{name}.lora_A.weight"] = down.to(torch.bfloat16)
            tensors[f"transformer.{name}.lora_B.weight"] = up.to(torch.bfloat16)
    save_file(tensors, path)
    return path.stat().st_size


def worker(mode: str, checkpoint: str, lora: str, steps: int, images: int, out: Path) -> dict[str, Any]:
    """Runs in its own process; returns one mode's measurements."""
    import numpy as np
    import psutil
    import torch

    kind, _, rest = mode.partition(":")
    variant, _, cap = rest.partition("@")
    if cap:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(float(cap) * 2**30 / total)
    process = psutil.Process()
    record: dict[str, Any] = {"mode": mode}

    def timed(call: Any) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        torch.cuda.synchronize()
        return time.perf_counter() - started

    started = time.perf_counter()
    if kind == "ours":
        from zimage_turbo import Generator, ZImageSettings

        gen = Generator(model=checkpoint, strategy=variant, settings=ZImageSettings(progress=False), load=True)

        def image(seed: int) -> Any:
            return gen.generate(PROMPT, height=SIZE, width=SIZE, steps=steps, seed=seed).image

        def load_lora() -> None:
            gen.load_lora(lora, scale=0.8)

        def unload_lora() -> None:
            gen.unload_lora()

    else:
        from diffusers import ZImagePipeline

        pipe = ZImagePipeline.from_pretrained(checkpoint, dtype=torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        if variant == "group_offload":
            pipe.load_lora_weights(lora, adapter_name="style")
            pipe.set_adapters(["style"], [0.8])
        if variant.startswith("group_offload"):
            pipe.enable_group_offload(
                onload_device=torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1, use_stream=True
            )
        else:
            pipe.to("cuda")

        def image(seed: int) -> Any:
            return pipe(
                PROMPT,
                height=SIZE,
                width=SIZE,
                num_inference_steps=steps,
                guidance_scale=0.0,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]

        def load_lora() -> None:
            pipe.load_lora_weights(lora, adapter_name="style")
            pipe.set_adapters(["style"], [0.8])

        def unload_lora() -> None:
            pipe.unfuse_lora()
            pipe.unload_lora_weights()

    torch.cuda.synchronize()
    record["load_s"] = time.perf_counter() - started
    record["warmup_s"] = timed(lambda: image(0))
    label = mode.replace(":", "_").replace("@", "_")
    plain = [timed(lambda s=seed: image(s)) for seed in range(1, images + 1)]  # type: ignore[misc]
    base = np.asarray(image(1))
    # group offload with a LoRA loads it before the offload is enabled: its first images have it already
    key = "lora" if variant == "group_offload" else "plain"
    record[f"{key}_median_s"] = statistics.median(plain)
    record[f"{key}_all_s"] = plain
    record["rss_before_lora_gib"] = process.memory_info().rss / 2**30
    if variant == "group_offload":
        image(1).save(out / f"{label}-lora.png")
    elif variant != "group_offload_plain":
        first: list[Any] = []
        record["load_lora_plus_first_image_s"] = timed(lambda: (load_lora(), first.append(image(1))))
        with_lora = [timed(lambda s=seed: image(s)) for seed in range(1, images + 1)]  # type: ignore[misc]
        record["lora_median_s"] = statistics.median(with_lora)
        record["lora_all_s"] = with_lora
        lora_image = image(1)
        lora_image.save(out / f"{label}-lora.png")
        record["rss_with_lora_gib"] = process.memory_info().rss / 2**30
        record["lora_changes_image"] = bool((np.asarray(lora_image) != base).any())
    if kind == "diffusers" and variant == "to_cuda":
        record["fuse_lora_s"] = timed(lambda: pipe.fuse_lora())
        fused = [timed(lambda s=seed: image(s)) for seed in range(1, images + 1)]  # type: ignore[misc]
        record["fused_median_s"] = statistics.median(fused)
        image(1).save(out / f"{label}-fused.png")
    if variant in ("full_gpu", "hybrid", "streamed", "to_cuda"):
        record["unload_lora_s"] = timed(unload_lora)
        record["unload_bit_exact"] = bool(np.array_equal(np.asarray(image(1)), base))
    record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    record["host_peak_rss_gib"] = process.memory_info().rss / 2**30
    import resource

    record["host_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    return record


def compare(out: Path) -> dict[str, Any]:
    """Pixel differences of the LoRA images between modes (uint8 levels)."""
    import numpy as np
    from PIL import Image

    images = {p.stem: np.asarray(Image.open(p)).astype(int) for p in sorted(out.glob("*.png"))}
    reference = images.get("ours_full_gpu-lora")
    if reference is None:
        return {}
    return {
        name: {"max": int(np.abs(img - reference).max()), "mean": float(np.abs(img - reference).mean())}
        for name, img in images.items()
        if name != "ours_full_gpu-lora"
    }


def environment() -> dict[str, Any]:
    import diffusers
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "gpu_memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "git_commit": os.environ.get("ZT_GIT_COMMIT", "unknown"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="folder of a full-size checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write (images go beside it)")
    parser.add_argument("--steps", type=int, default=8, help="transformer passes per image")
    parser.add_argument("--images", type=int, default=3, help="timed images per phase, after one warm-up")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--lora", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    images_dir = args.out.parent / (args.out.stem + "-images")
    if args.worker:
        result = worker(args.worker, args.checkpoint, args.lora, args.steps, args.images, images_dir)
        print("RESULT " + json.dumps(result), flush=True)
        return

    images_dir.mkdir(parents=True, exist_ok=True)
    lora = images_dir / "rank32.safetensors"
    lora_bytes = make_lora(args.checkpoint, lora)
    report: dict[str, Any] = {
        "benchmark": "lora",
        "size": SIZE,
        "steps": args.steps,
        "rank": RANK,
        "lora_file_bytes": lora_bytes,
        "prompt": PROMPT,
        "images_per_phase": args.images,
        "environment": environment(),
        "cases": [],
    }
    for mode in args.modes:
        command = [sys.executable, __file__, "--worker", mode, "--checkpoint", args.checkpoint, "--out", str(args.out)]
        command += ["--steps", str(args.steps), "--images", str(args.images), "--lora", str(lora)]
        run = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            report["cases"].append({"mode": mode, "error": run.stderr[-3000:]})
            print(f"{mode}: failed\n{run.stderr[-3000:]}", file=sys.stderr, flush=True)
        else:
            report["cases"].append(json.loads(lines[-1].removeprefix("RESULT ")))
            print(lines[-1], flush=True)
        # written after every mode, so that a run stopped by a time limit keeps what it measured
        report["lora_image_difference_from_ours_full_gpu"] = compare(images_dir)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    lora.unlink()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
