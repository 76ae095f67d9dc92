"""Where ours' image-to-image departs from diffusers' on a GPU: the VAE encoder's output and every transformer
pass's inputs (latents, timestep, prompt embeddings), captured by global module hooks in one process.

Usage: python scripts/diagnose_task_difference.py CHECKPOINT [SIZE]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from zimage_turbo import Generator, ZImageSettings

PROMPT = "the same harbour in a snowstorm at dusk, oil painting"


def picture(size: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // (2 * size)], axis=-1)
    noise = np.random.default_rng(size).integers(-24, 24, rgb.shape)
    return Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8))


def capture(log: list[tuple[str, Any]]) -> list[Any]:
    from diffusers import ZImageTransformer2DModel
    from diffusers.models.autoencoders.vae import Encoder

    def before(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, ZImageTransformer2DModel):
            x, t, caps = args[:3]
            log.append(
                (
                    "pass",
                    (
                        [e.detach().float().cpu() for e in x],
                        t.detach().float().cpu(),
                        [c.detach().float().cpu() for c in caps],
                    ),
                )
            )

    def after(module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if isinstance(module, Encoder):
            log.append(("encoder", (args[0].detach().float().cpu(), out.detach().float().cpu())))

    return [
        torch.nn.modules.module.register_module_forward_pre_hook(before),
        torch.nn.modules.module.register_module_forward_hook(after),
    ]


def largest(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"max |diff| {float((a - b).abs().max()):.3g} (scale {float(a.abs().max()):.3g})"


def main() -> None:
    path, size = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    from diffusers import ZImageImg2ImgPipeline

    image = picture(size)
    theirs: list[tuple[str, Any]] = []
    hooks = capture(theirs)
    pipe = ZImageImg2ImgPipeline.from_pretrained(path, dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        PROMPT, image=image, num_inference_steps=8, guidance_scale=0.0, generator=torch.Generator().manual_seed(42)
    ).images[0]
    print("diffusers' modules:", {n: str(getattr(m, "dtype", "")) for n, m in pipe.components.items()})
    del pipe
    torch.cuda.empty_cache()
    for h in hooks:
        h.remove()
    ours: list[tuple[str, Any]] = []
    hooks = capture(ours)
    gen = Generator(model=path, strategy="full_gpu", settings=ZImageSettings(progress=False, attention="native"))
    result = gen.generate(PROMPT, image=image, steps=8, seed=42)
    print("ours' modules:", {n: str(getattr(m, "dtype", "")) for n, m in gen.pipeline.components.items()})
    for h in hooks:
        h.remove()
    print("events: diffusers", [k for k, _ in theirs], "ours", [k for k, _ in ours])
    pairs = list(zip([v for k, v in theirs if k == "encoder"], [v for k, v in ours if k == "encoder"], strict=False))
    for i, ((xa, ya), (xb, yb)) in enumerate(pairs):
        print(f"encoder {i}: input {largest(xa, xb)}; output {largest(ya, yb)}")
    passes = list(zip([v for k, v in theirs if k == "pass"], [v for k, v in ours if k == "pass"], strict=False))
    for i, ((xa, ta, ca), (xb, tb, cb)) in enumerate(passes):
        print(
            f"pass {i}: latents {largest(xa[0], xb[0])}; t {ta.tolist()} vs {tb.tolist()}; "
            f"embeds {largest(ca[0], cb[0])}"
        )
    diff = np.abs(np.asarray(result.image).astype(int) - np.asarray(reference).astype(int))
    print(f"image: max {diff.max()}, mean {diff.mean():.4f}")


if __name__ == "__main__":
    main()
