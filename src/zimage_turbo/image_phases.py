"""Image-to-image and inpainting: the phase that encodes their input images, and their denoising, by diffusers.

diffusers' ``ZImageImg2ImgPipeline`` and ``ZImageInpaintPipeline`` run the VAE encoder inside their
``__call__``, between the prompt and the denoising loop: on the input image, and for inpainting on the image with
the mask's area blanked as well. Here that encoder pass is a phase of its own, ``encode_image``, with its own
memory estimate and its own place on the out-of-memory ladder:

* :func:`encode_images` runs the VAE encoder on exactly the tensors the pipeline will hand it (made by the
  pipeline's own image and mask processors) and keeps what the encoder returns: the parameters of the latent
  distribution, a latent-sized tensor per input;
* :func:`denoise_encoded` then calls the pipeline, built on the same loaded modules (:func:`task_pipeline`: no
  copy, no reload), given :func:`image_arguments`, with the VAE's ``encode`` answering from those parameters. The
  pipeline samples the latent distribution, scales, draws the noise, noises the latents, runs the schedule cut by
  ``strength`` and, for inpainting, blends the kept area back after every step, exactly as it always does, with
  the same draws from the same generators: the image is diffusers' own, bit for bit on a CPU
  (tests/test_tasks.py). An encoder input that was not encoded here (none is expected) is encoded there, as
  diffusers would.

The parameters stay where the encoder made them; a retry on another rung moves them to where it computes.
ControlNet requests run the same way through diffusers' ControlNet pipelines (:mod:`~zimage_turbo.control_phases`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .controlnet import controlnet_of, share_transformer
from .execution import pin_execution_device
from .phases import denoise
from .quiet_imports import quiet_imports
from .task_inputs import TaskInputs, TaskName

__all__ = [
    "EncodedImages",
    "denoise_encoded",
    "encode_images",
    "encoder_answering",
    "image_arguments",
    "noise_generators",
    "task_pipeline",
]

logger = logging.getLogger(__name__)

_SIBLINGS = "_zimage_turbo_task_pipelines"
# the diffusers pipeline of each task but text-to-image (ZImagePipeline itself)
_PIPELINES = {
    "image_to_image": "ZImageImg2ImgPipeline",
    "inpaint": "ZImageInpaintPipeline",
    "control": "ZImageControlNetPipeline",
    "control_inpaint": "ZImageControlNetInpaintPipeline",
}


@dataclass(frozen=True)
class EncodedImages:
    """What the ``encode_image`` phase leaves for the denoising: the inputs as the pipeline is given them, and each
    encoder input (float32, on the host) with the encoder's output for it."""

    image: Image.Image | None
    mask: Image.Image | None
    encoded: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    dtype: torch.dtype  # the dtype the encoder ran in
    control: Image.Image | None = None  # a ControlNet request's control image


def task_pipeline(pipe: Any, task: TaskName) -> Any:
    """The diffusers pipeline of ``task`` on the modules of ``pipe`` (a ``ZImagePipeline``): ``pipe`` itself for
    text-to-image, else a sibling made once from ``pipe.components`` (the same module objects, so that whatever a
    strategy placed or hooked is what the sibling runs; for ControlNet tasks with the pipeline's ControlNet, see
    :mod:`~zimage_turbo.controlnet`) and made again if a component was replaced."""
    if task == "text_to_image":
        return pipe
    with quiet_imports():
        import diffusers

    made: dict[str, Any] = pipe.__dict__.setdefault(_SIBLINGS, {})
    components = dict(pipe.components)
    controlnet = controlnet_of(pipe) if task.startswith("control") else None
    if controlnet is not None:
        components["controlnet"] = controlnet
    sibling = made.get(task)
    if sibling is None or any(getattr(sibling, name) is not module for name, module in components.items()):
        sibling = getattr(diffusers, _PIPELINES[task])(**components)
        made[task] = sibling
        if controlnet is not None:
            share_transformer(controlnet, pipe.transformer)  # the constructor registered the shared modules
    # the base pipeline's progress bar (ours, with its options: see loader.py) serves the sibling too
    sibling.progress_bar = pipe.progress_bar
    return sibling


def encode_images(pipe: Any, inputs: TaskInputs, height: int, width: int, device: torch.device) -> EncodedImages:
    """The ``encode_image`` phase: the VAE encoder over the inputs of ``inputs`` at ``height`` x ``width``."""
    sibling = task_pipeline(pipe, inputs.task)
    assert inputs.image is not None
    image = inputs.image.loaded().pixels
    assert image is not None
    if image.size != (width, height):
        image = sibling.image_processor.resize(image, height, width)  # diffusers' resize (Lanczos)
    # what ZImageImg2ImgPipeline.__call__ and ZImageInpaintPipeline.__call__ make of the image and the mask
    pixels = sibling.image_processor.preprocess(image).to(dtype=torch.float32)
    wanted = [pixels]
    mask = None
    if inputs.mask is not None:
        mask = inputs.mask.loaded().pixels
        assert mask is not None
        blank = sibling.mask_processor.preprocess(mask, height=height, width=width) < 0.5
        wanted.append(pixels * blank)
    vae = sibling.vae
    encoded = tuple((x, vae.encode(x.to(device=device, dtype=vae.dtype)).latent_dist.parameters) for x in wanted)
    return EncodedImages(image, mask, encoded, vae.dtype)


def image_arguments(encoded: EncodedImages, strength: float) -> dict[str, Any]:
    """What an image-to-image or inpainting pipeline is given besides the prompt and the shape: the inputs
    :func:`encode_images` encoded, and ``strength``."""
    arguments: dict[str, Any] = {"image": encoded.image, "strength": strength}
    if encoded.mask is not None:
        arguments["mask_image"] = encoded.mask
    return arguments


def denoise_encoded(
    pipe: Any,
    task: TaskName,
    encoded: EncodedImages,
    embeds: tuple[list[torch.Tensor], list[torch.Tensor]],
    task_arguments: dict[str, Any],
    *,
    height: int,
    width: int,
    steps: int,
    guidance_scale: float,
    num_images: int,
    generator: torch.Generator | list[torch.Generator],
    on_step: Callable[[int, float, torch.Tensor], None] | None,
    device: torch.device,
) -> torch.Tensor:
    """Latents of a request with input images, denoised by ``task``'s diffusers pipeline given ``task_arguments``
    (:func:`image_arguments`, :func:`~zimage_turbo.control_phases.control_arguments`), its VAE's ``encode``
    answering from what the ``encode_image`` phase kept in ``encoded`` (see the module's description)."""
    sibling = task_pipeline(pipe, task)
    pin_execution_device(sibling, device)  # as the placement pinned the base pipeline (see execution.py)
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
            **task_arguments,
        )


def noise_generators(
    seeds: tuple[int, ...],
    given: torch.Generator | list[torch.Generator] | None,
    states: list[torch.Tensor] | None,
) -> tuple[torch.Generator | list[torch.Generator], list[torch.Tensor] | None]:
    """What the pipeline draws from, and the generators' states to keep for a retry.

    From ``seeds``: one new CPU generator per image, as text-to-image draws them. From the caller's ``given``
    generator(s): their states are kept before the first attempt (``states`` None) and put back before a retry, so
    that the image is the one diffusers makes from generators in that state, however many rungs it took."""
    if given is None:
        return [torch.Generator("cpu").manual_seed(seed) for seed in seeds], None
    each = given if isinstance(given, list) else [given]
    if states is None:
        states = [g.get_state() for g in each]
    else:
        for g, state in zip(each, states, strict=True):
            g.set_state(state)
    return given, states


@contextlib.contextmanager
def encoder_answering(vae: Any, encoded: EncodedImages) -> Iterator[None]:
    """``vae.encode`` answers from ``encoded`` inside the block, for inputs equal to those encoded in that dtype."""
    with quiet_imports():
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

    real = vae.encode

    def encode(x: torch.Tensor, return_dict: bool = True) -> Any:
        for key, parameters in encoded.encoded:
            if x.dtype == encoded.dtype and x.shape == key.shape and torch.equal(x, key.to(x.device, x.dtype)):
                posterior = DiagonalGaussianDistribution(parameters.to(x.device))
                return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)
        logger.debug("the pipeline encodes an input of shape %s that the encode_image phase did not", tuple(x.shape))
        return real(x, return_dict=return_dict)

    own = vars(vae).get("encode")  # an encode set on the instance before (none, normally)
    vae.encode = encode
    try:
        yield
    finally:
        if own is None:
            del vae.encode  # the class's method again
        else:
            vae.encode = own
