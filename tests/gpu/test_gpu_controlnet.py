"""ControlNet text-to-image and ControlNet inpainting on a GPU, against diffusers' own pipelines.

The full-size checkpoint with a full-size random ControlNet (the architecture of the published Z-Image-Turbo Fun
ControlNet Union 2.1) is compared with ``ZImageControlNetPipeline`` / ``ZImageControlNetInpaintPipeline`` loaded by
``from_pretrained(dtype=bfloat16).to("cuda")`` with the same seed, within the tolerance of test_gpu_tasks.py;
under ``full_gpu`` (the ControlNet resident) and ``streamed`` (its blocks streamed beside the transformer's,
which it shares the refiners of). The tiny checkpoint in float32 must agree to one level.

The ControlNet comes from ``ZIMAGE_TEST_FULL_CHECKPOINT/controlnet`` when that checkpoint was made with
``--controlnet``; otherwise one is built on the GPU (seconds) and saved beside the session's files (6.7 GB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_turbo import Generator, ZImageSettings, make_checkpoint
from zimage_turbo.hardware import GIB

pytestmark = pytest.mark.gpu

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def _inputs(size: int) -> dict[str, Image.Image]:
    """A control image (lines, as an edge map has them), a picture and a mask."""
    edges = np.zeros((size, size, 3), np.uint8)
    edges[size // 8 : size - size // 8 : size // 16, :, :] = 255
    edges[:, size // 5 : size - size // 5 : size // 10, 1] = 200
    y, x = np.mgrid[0:size, 0:size]
    picture = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // (2 * size)], axis=-1).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return {
        "control_image": Image.fromarray(edges),
        "image": Image.fromarray(picture),
        "mask_image": Image.fromarray(mask),
    }


def _arguments(task: str, size: int) -> dict[str, Image.Image]:
    inputs = _inputs(size)
    return inputs if task == "control_inpaint" else {"control_image": inputs["control_image"]}


def _difference(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16))


def _diffusers(path: Path, controlnet_folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import ZImageControlNetInpaintPipeline, ZImageControlNetModel, ZImageControlNetPipeline

    controlnet = ZImageControlNetModel.from_pretrained(controlnet_folder, dtype=dtype)
    pipe = ZImageControlNetPipeline.from_pretrained(path, controlnet=controlnet, dtype=dtype).to("cuda")
    # built on the same modules, as they are: from_pipe casts the modules it shares to its dtype argument, and that
    # casts the text encoder's rotary inv_freq, which from_pretrained keeps in float32, to bf16 too (prompt
    # embeddings, and so the image, then differ from what a user's from_pretrained pipeline makes)
    pipes = {"control": pipe, "control_inpaint": ZImageControlNetInpaintPipeline(**pipe.components)}
    for each in pipes.values():
        each.set_progress_bar_config(disable=True)
    return pipes


def _theirs(pipes: dict[str, Any], task: str, size: int, steps: int, seed: int) -> Any:
    return pipes[task](
        PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=0.0,
        controlnet_conditioning_scale=0.75,
        generator=torch.Generator().manual_seed(seed),
        **_arguments(task, size),
    ).images[0]


@pytest.fixture(scope="module")
def full_controlnet(full_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a full-size ControlNet for the full checkpoint."""
    made = full_checkpoint / "controlnet"
    if (made / "config.json").is_file():
        return made
    from zimage_turbo.checkpoints import _build_controlnet
    from zimage_turbo.model import PRESETS

    folder = tmp_path_factory.mktemp("controlnet") / "controlnet"
    _build_controlnet(PRESETS["full"], 0, torch.device("cuda")).save_pretrained(folder)
    torch.cuda.empty_cache()
    return folder


@pytest.fixture(scope="module")
def full_references(full_checkpoint: Path, full_controlnet: Path) -> dict[str, Image.Image]:
    """diffusers' images at 1024x1024, 8 steps, seed 42; its pipelines freed before ours load."""
    pipes = _diffusers(full_checkpoint, full_controlnet, torch.bfloat16)
    made = {task: _theirs(pipes, task, 1024, 8, 42) for task in pipes}
    del pipes
    torch.cuda.empty_cache()
    return made


@pytest.mark.parametrize("strategy", ["full_gpu", "streamed"])
def test_full_size_controlnet_matches_diffusers(
    full_checkpoint: Path, full_controlnet: Path, full_references: dict[str, Image.Image], strategy: str
) -> None:
    # diffusers runs PyTorch's own choice of attention kernel; "auto" may time another exact kernel as faster,
    # whose rounding differs (with it, 2026-11-29: mean 0.68, max 6): compare like with like
    settings = ZImageSettings(progress=False, controlnet=str(full_controlnet), attention="native")
    gen = Generator(model=full_checkpoint, strategy=strategy, settings=settings)
    for task, reference in full_references.items():
        result = gen.generate(PROMPT, steps=8, seed=42, **_arguments(task, 1024))
        assert (result.strategy, result.task, result.image.size) == (strategy, task, (1024, 1024))
        assert result.timings.encode_image > 0 and result.fallbacks == ()
        difference = _difference(result.image, reference)
        peak = result.peak_memory["cuda:0"] / GIB
        shown = f"max abs diff {difference.max()}, mean {difference.mean():.4f}, peak {peak:.2f} GiB"
        print(f"{strategy} {task} ({result.attention} attention): {shown}")
        assert difference.mean() < 0.5 and difference.max() <= 8
        predicted = result.predicted_peak_memory["cuda:0"] / GIB
        assert peak <= predicted * 1.1, "the planner under-estimated this task's peak"
    gen.close()


def test_tiny_controlnet_on_the_gpu_matches_diffusers_in_float32(tmp_path: Path) -> None:
    checkpoint = make_checkpoint("tiny", tmp_path / "tiny", controlnet=True)
    pipes = _diffusers(checkpoint, checkpoint / "controlnet", torch.float32)
    settings = ZImageSettings(progress=False, dtype="float32", controlnet=str(checkpoint))
    gen = Generator(model=checkpoint, settings=settings)
    for task in pipes:
        ours = gen.generate(PROMPT, steps=5, seed=11, height=512, width=512, **_arguments(task, 512))
        # 2026-11-29 auto chose partial here (its prediction left out the image encoder; fixed): say why if again
        why = (ours.strategy, ours.fallbacks, ours.warnings, str(gen.plan(height=512, width=512, steps=5)))
        assert ours.strategy == "full_gpu" and ours.task == task, why
        assert _difference(ours.image, _theirs(pipes, task, 512, 5, 11)).max() <= 1
    gen.close()
