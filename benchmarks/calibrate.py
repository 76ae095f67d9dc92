"""Measure the constants of the memory and time model (src/zimage_turbo/profile.py) on a GPU.

With the full-size checkpoint resident on one GPU, each phase (encode, denoise, decode) runs at several image
sizes; for each, the memory it allocates beyond what was allocated before it (``max_memory_allocated`` minus
``memory_allocated`` at its start) and its time are recorded. The model's constants are then fitted:

* ``text_encoder_k``: encode peak / (512 tokens * hidden * dtype bytes);
* ``transformer_k``: denoise peak / ((image + caption tokens) * dim * dtype bytes), least squares;
* ``vae_k``: decode peak / (pixels * channels[0] * dtype bytes), least squares; ``vae_tiled_k`` likewise for
  one 512x512 tile with tiling on;
* speed: a transformer pass as fixed seconds plus seconds per TFLOP, seconds per encode, seconds per decoded
  megapixel, how much slower a tiled decode is, and the pinned host-to-device bandwidth.

    python benchmarks/calibrate.py --checkpoint DIR --out calibration.json
    cp calibration.json src/zimage_turbo/calibration.json   # after reading it

The JSON keeps every measurement next to the fit, and the largest relative error of the fit.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from zimage_turbo import Generator, ModelProfile, Workload, ZImageSettings
from zimage_turbo.model import MAX_SEQUENCE_LENGTH, VAE_TILE_PIXELS
from zimage_turbo.phases import decode, denoise, encode, set_vae_tiling

PROMPT = "a lighthouse on a rocky coast at sunset, oil painting, dramatic clouds, warm light"
SIZES = [(512, 512), (768, 768), (1024, 768), (1024, 1024), (1536, 1024), (1536, 1536), (2048, 2048)]
STEPS = 4


def _phase(run: Any) -> tuple[Any, int, float]:
    """Run one phase; return its output, the bytes it allocated beyond its start, and its seconds."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    output = run()
    torch.cuda.synchronize()
    return output, torch.cuda.max_memory_allocated() - base, time.perf_counter() - started


def pinned_bandwidth(gib: float = 2.0) -> dict[str, float]:
    nbytes = int(gib * 2**30)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    target = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    speeds = {}
    for name, source in (("pinned", pinned), ("pageable", pageable)):
        times = []
        for _ in range(4):
            torch.cuda.synchronize()
            started = time.perf_counter()
            target.copy_(source, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        speeds[f"{name}_gib_per_s"] = gib / statistics.median(times[1:])
    return speeds


def _through_origin(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of y = k x, and the largest relative error of the fit."""
    k = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    worst = max(abs(k * x - y) / y for x, y in zip(xs, ys, strict=True) if y)
    return k, worst


def _affine(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares y = a + b x; returns a, b and the largest relative error."""
    n = len(xs)
    sx, sy = sum(xs), sum(ys)
    sxx = sum(x * x for x in xs)
    sxy = sum(x * y for x, y in zip(xs, ys, strict=True))
    b = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    a = (sy - b * sx) / n
    return a, b, max(abs(a + b * x - y) / y for x, y in zip(xs, ys, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    gen = Generator(model=args.checkpoint, strategy="full_gpu", settings=ZImageSettings(progress=False), load=True)
    pipe = gen.pipeline
    profile = ModelProfile.from_layout(gen.model.layout)  # type: ignore[union-attr]
    device = torch.device("cuda", 0)
    dtype_bytes = profile.dtype_bytes
    rows = []
    with torch.inference_mode():
        encode(pipe, PROMPT, None, False, device)  # warm-up
        embeds, encode_peak, encode_s = _phase(lambda: encode(pipe, PROMPT, None, False, device))
        caption = -(-embeds[0][0].shape[0] // 32) * 32
        for width, height in SIZES:
            for tiling in (False, True):
                set_vae_tiling(pipe, tiling)
                latents, denoise_peak, denoise_s = _phase(
                    functools.partial(
                        denoise, pipe, embeds, height=height, width=width, steps=STEPS, guidance_scale=0.0, seeds=[0]
                    )
                )
                decode(pipe, latents)  # warm-up at this size
                _, decode_peak, decode_s = _phase(functools.partial(decode, pipe, latents))
                work = Workload(height, width)
                rows.append(
                    {
                        "width": width,
                        "height": height,
                        "vae_tiling": tiling,
                        "caption_tokens": caption,
                        "image_tokens": work.image_tokens,
                        "encode_peak": encode_peak,
                        "denoise_peak": denoise_peak,
                        "decode_peak": decode_peak,
                        "encode_s": encode_s,
                        "pass_s": denoise_s / STEPS,
                        "decode_s": decode_s,
                        "pass_tflop": profile.transformer_pass_tflop(work),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        set_vae_tiling(pipe, False)
    bandwidth = pinned_bandwidth()

    untiled = [r for r in rows if not r["vae_tiling"]]
    tiled = [r for r in rows if r["vae_tiling"] and max(r["width"], r["height"]) > VAE_TILE_PIXELS]
    per_token = [(r["image_tokens"] + r["caption_tokens"]) * profile.transformer_dim * dtype_bytes for r in untiled]
    transformer_k, transformer_err = _through_origin(per_token, [r["denoise_peak"] for r in untiled])
    per_pixel = [r["width"] * r["height"] * profile.vae_channels * dtype_bytes for r in untiled]
    vae_k, vae_err = _through_origin(per_pixel, [r["decode_peak"] for r in untiled])
    tile = VAE_TILE_PIXELS**2 * profile.vae_channels * dtype_bytes
    vae_tiled_k = max((r["decode_peak"] - r["width"] * r["height"] * 12) / tile for r in tiled)
    # Each size runs twice (without and with tiling); the first pass at a new shape includes warm-up, so the
    # faster of the two is the pass time. Small passes have a fixed cost (launches): fit time = a + b * TFLOP.
    fastest = {
        (r["width"], r["height"]): min(
            q["pass_s"] for q in rows if (q["width"], q["height"]) == (r["width"], r["height"])
        )
        for r in untiled
    }
    pass_fixed, seconds_per_tflop, pass_err = _affine(
        [r["pass_tflop"] for r in untiled], [fastest[(r["width"], r["height"])] for r in untiled]
    )
    slowdown = max(
        r["decode_s"] / next(q["decode_s"] for q in untiled if (q["width"], q["height"]) == (r["width"], r["height"]))
        for r in tiled
    )
    per_mp, decode_err = _through_origin(
        [r["width"] * r["height"] / 1e6 for r in untiled], [r["decode_s"] for r in untiled]
    )
    fit = {
        "text_encoder_k": encode_peak / (MAX_SEQUENCE_LENGTH * profile.text_hidden * dtype_bytes),
        "transformer_k": transformer_k,
        "vae_k": vae_k,
        "vae_tiled_k": vae_tiled_k,
        "transformer_pass_s_per_tflop": seconds_per_tflop,
        "transformer_pass_s_fixed": pass_fixed,
        "vae_tiling_slowdown": slowdown,
        "text_encoder_s": encode_s,
        "vae_s_per_megapixel": per_mp,
        "pinned_gib_per_s": bandwidth["pinned_gib_per_s"],
    }
    report = {
        "source": f"benchmarks/calibrate.py on {torch.cuda.get_device_name(0)}, {datetime.date.today()}",
        "gpu": torch.cuda.get_device_name(0),
        "dtype": "bfloat16",
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "git_commit": os.environ.get("ZT_GIT_COMMIT", "unknown"),
        "fit": fit,
        "fit_max_relative_error": {
            "transformer": transformer_err,
            "vae": vae_err,
            "pass_seconds": pass_err,
            "decode_seconds": decode_err,
        },
        "bandwidth": bandwidth,
        "measurements": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"fit": fit, "errors": report["fit_max_relative_error"], "bandwidth": bandwidth}, indent=2))


if __name__ == "__main__":
    main()
