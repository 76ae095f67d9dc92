"""ControlNet text-to-image and ControlNet inpainting: the phase that encodes their inputs, and their denoising.

diffusers' ``ZImageControlNetPipeline`` encodes the control image with the VAE inside its ``__call__`` (its
latent distribution's mode: no randomness), repeated once per image; ``ZImageControlNetInpaintPipeline`` also
encodes the image with the mask's area blanked, and hands the ControlNet both, with the mask, as one control
input. As for image-to-image (:mod:`~zimage_turbo.image_phases`), that encoder work is the ``encode_image`` phase:

* :func:`encode_control` runs the VAE encoder on exactly the tensors the pipeline will hand it, made by the
  pipeline's own image and mask processors, and keeps what the encoder returns;
* :func:`denoise_control` calls the pipeline, built on the same loaded modules and the pipeline's ControlNet
  (:func:`~zimage_turbo.image_phases.task_pipeline`), with the VAE's ``encode`` answering from what was kept.
  Everything else is the pipeline's own code: the noise drawn from the same generators, the ControlNet's hints
  scaled by ``control_scale`` and added to the transformer's layers at each step. The image is diffusers' own,
  bit for bit on a CPU (tests/test_controlnet.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .execution import pin_execution_device
from .image_phases import EncodedImages, encoder_answering, task_pipeline
from .phases import denoise
from .task_inputs import TaskInputs, TaskName

__all__ = ["denoise_control", "encode_control"]


def encode_control(
    pipe: Any, inputs: TaskInputs, height: int, width: int, images: int, device: torch.device
) -> EncodedImages:
    """The ``encode_image`` phase of a ControlNet request of ``images`` images at ``height`` x ``width``."""
    sibling = task_pipeline(pipe, inputs.task)
    processor, vae = sibling.image_processor, sibling.vae
    assert inputs.control is not None
    control = inputs.control.loaded().pixels
    assert control is not None

    def prepared(picture: Any) -> torch.Tensor:
        # what the pipelines' prepare_image makes of a picture (before its cast to the VAE's dtype)
        pixels = processor.preprocess(picture, height=height, width=width).to(dtype=torch.float32)
        return pixels.repeat_interleave(images, dim=0)  # type: ignore[no-any-return]

    wanted = [prepared(control)]
    image = mask = None
    if inputs.mask is not None:
        assert inputs.image is not None
        image, mask = inputs.image.loaded().pixels, inputs.mask.loaded().pixels
        condition = sibling.mask_processor.preprocess(mask, height=height, width=width)
        wanted.append(prepared(image) * (torch.tile(condition, [1, 3, 1, 1]) < 0.5))
    encoded = tuple((x, vae.encode(x.to(device=device, dtype=vae.dtype)).latent_dist.parameters) for x in wanted)
    return EncodedImages(image, mask, encoded, vae.dtype, control=control)


def denoise_control(
    pipe: Any,
    task: TaskName,
    encoded: EncodedImages,
    embeds: tuple[list[torch.Tensor], list[torch.Tensor]],
    *,
    control_scale: float,
    height: int,
    width: int,
    steps: int,
    guidance_scale: float,
    num_images: int,
    generator: torch.Generator | list[torch.Generator],
    on_step: Callable[[int, float, torch.Tensor], None] | None,
    device: torch.device,
) -> torch.Tensor:
    """Latents of a ControlNet request, denoised by ``task``'s diffusers pipeline from the inputs
    :func:`encode_control` encoded (see the module's description)."""
    sibling = task_pipeline(pipe, task)
    pin_execution_device(sibling, device)  # as the placement pinned the base pipeline (see execution.py)
    arguments: dict[str, Any] = {"control_image": encoded.control, "controlnet_conditioning_scale": control_scale}
    if encoded.mask is not None:
        arguments.update(image=encoded.image, mask_image=encoded.mask)
    with encoder_answering(sibling.vae, encoded):
        return denoise(
            sibling,
            embeds,
            height=height,
            width=width,
            steps=steps,
            guidance_scale=guidance_scale,
            seeds=(),
            on_step=on_step,
            device=device,
            generator=generator,
            num_images=num_images,
            **arguments,
        )
