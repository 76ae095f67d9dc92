"""LoRA on the full-size checkpoint: diffusers' fused image under full_gpu, the same image under hybrid and
streamed, fp8 quantizing the fused weights, and the base image back bit for bit after unloading."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_turbo import FullGPU, Generator, ZImageSettings

pytestmark = pytest.mark.gpu

PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"
SIZE = {"height": 512, "width": 512, "steps": 4}
SEED = 3
SCALE = 0.8
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")


def _pixels(image: object) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _make_lora(checkpoint: Path, path: Path) -> None:
    """A random rank-8 LoRA on the attention and feed-forward linears of the main blocks, bf16."""
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file

    config = ZImageTransformer2DModel.load_config(checkpoint / "transformer")
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(config)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("layers.") and name.endswith(TARGETS):
            down = torch.randn(8, module.in_features, generator=generator) / module.in_features**0.5
            tensors[f"transformer.{name}.lora_A.weight"] = down.to(torch.bfloat16)
            up = torch.randn(module.out_features, 8, generator=generator) * 0.05
            tensors[f"transformer.{name}.lora_B.weight"] = up.to(torch.bfloat16)
    save_file(tensors, path)


def _diffusers_fused(checkpoint: Path, lora: Path) -> object:
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(checkpoint, dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.set_adapters(["style"], [SCALE])
    pipe.fuse_lora(adapter_names=["style"])
    image = pipe(
        PROMPT,
        num_inference_steps=SIZE["steps"],
        height=SIZE["height"],
        width=SIZE["width"],
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(SEED),
    ).images[0]
    del pipe
    torch.cuda.empty_cache()
    return image


def test_lora_under_every_gpu_placement(full_checkpoint: Path, tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    _make_lora(full_checkpoint, lora)
    with Generator(model=str(full_checkpoint), strategy="full_gpu", settings=ZImageSettings(progress=False)) as gen:
        base = gen.generate(PROMPT, seed=SEED, **SIZE).image
        started = time.perf_counter()
        gen.load_lora(lora, scale=SCALE)
        print(f"load_lora under full_gpu: {time.perf_counter() - started:.2f} s")
        images = {"full_gpu": gen.generate(PROMPT, seed=SEED, **SIZE).image}
        for strategy in ("hybrid", "streamed", FullGPU(quantize="fp8")):
            gen.switch(strategy)
            result = gen.generate(PROMPT, seed=SEED, **SIZE)
            assert result.loras == {"style": SCALE}
            images[result.strategy + ("+fp8" if result.quantization else "")] = result.image
        started = time.perf_counter()
        gen.unload_lora()  # under fp8: the bf16 homes get their base values, then are quantized again
        print(f"unload_lora under full_gpu+fp8: {time.perf_counter() - started:.2f} s")
        gen.switch("full_gpu")
        assert np.array_equal(_pixels(gen.generate(PROMPT, seed=SEED, **SIZE).image), _pixels(base))
    reference = _pixels(images["full_gpu"])
    assert np.abs(reference - _pixels(base)).mean() > 2  # the LoRA changes the image
    theirs = _pixels(_diffusers_fused(full_checkpoint, lora))
    difference = np.abs(reference - theirs)
    print(f"ours full_gpu vs diffusers fuse_lora: max {difference.max()}, mean {difference.mean():.4f}")
    assert difference.mean() < 1.0
    for name in ("hybrid", "streamed"):
        other = np.abs(_pixels(images[name]) - reference)
        print(f"{name} vs full_gpu with the LoRA: max {other.max()}, mean {other.mean():.4f}")
        assert other.max() <= 2, name
    fp8 = _pixels(images["full_gpu+fp8"])
    print(
        f"fp8 vs full_gpu with the LoRA: mean {np.abs(fp8 - reference).mean():.3f}; "
        f"vs the base image: {np.abs(fp8 - _pixels(base)).mean():.3f}"
    )
    assert np.abs(fp8 - reference).mean() < np.abs(fp8 - _pixels(base)).mean()
