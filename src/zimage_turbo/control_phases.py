"""ControlNet text-to-image and ControlNet inpainting: the phase that encodes their inputs, and their denoising.

diffusers' ``ZImageControlNetPipeline`` encodes the control image with the VAE inside its ``__call__`` (its
latent distribution's mode: no randomness), repeated once per image; ``ZImageControlNetInpaintPipeline`` also
encodes the image with the mask's area blanked, and hands the ControlNet both, with the mask, as one control
input. As for image-to-image (:mod:`~zimage_turbo.image_phases`), that encoder work is the ``encode_image`` phase:

* :func:`encode_control` runs the VAE encoder on exactly the tensors the pipeline will hand it, made by the
  pipeline's own image and mask processors, and keeps what the encoder returns;
* :func:`~zimage_turbo.image_phases.denoise_encoded` calls the pipeline, built on the same loaded modules and the
  pipeline's ControlNet (:func:`~zimage_turbo.image_phases.task_pipeline`), given :func:`control_arguments`, with
  the VAE's ``encode`` answering from what was kept.
  Everything else is the pipeline's own code: the noise drawn from the same generators, the ControlNet's hints
  scaled by ``control_scale`` and added to the transformer's layers at each step. The image is diffusers' own,
  bit for bit on a CPU (tests/test_controlnet.py).
"""

from __future__ import annotations

from typing import Any

import torch

from .image_phases import EncodedImages, task_pipeline
from .task_inputs import TaskInputs

__all__ = ["control_arguments", "encode_control"]


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


def control_arguments(encoded: EncodedImages, control_scale: float) -> dict[str, Any]:
    """What a ControlNet pipeline is given besides the prompt and the shape: the inputs :func:`encode_control`
    encoded, and ``control_scale``; the pipeline is run by :func:`~zimage_turbo.image_phases.denoise_encoded`."""
    arguments: dict[str, Any] = {"control_image": encoded.control, "controlnet_conditioning_scale": control_scale}
    if encoded.mask is not None:
        arguments.update(image=encoded.image, mask_image=encoded.mask)
    return arguments
