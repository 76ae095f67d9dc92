"""The phases of one generation, run separately so that each can be timed and retried on its own.

Together they do exactly what ``ZImagePipeline.__call__`` does (the CPU tests check this bit for bit):
encode the prompt, denoise from seeded noise to latents, decode the latents with the VAE. Splitting them
means that when the decode runs out of memory, the same latents are decoded again with VAE tiling instead
of repeating the whole denoising. Image-to-image and inpainting add the encoding of their input images
(:mod:`~zimage_turbo.image_phases`) and denoise through their own diffusers pipelines, with :func:`denoise`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import GenerationInterruptedError
from .model import MAX_SEQUENCE_LENGTH, VAE_TILE_PIXELS

__all__ = [
    "MAX_SEQUENCE_LENGTH",
    "PhaseClock",
    "Progress",
    "count_prompt_tokens",
    "decode",
    "denoise",
    "draw_noise",
    "encode",
    "noise_shape",
    "release_memory",
    "set_vae_tiling",
]


@dataclass
class Progress:
    """What a generation has finished so far, so that a retry (after running out of memory) can start from it.
    The tensors stay where they were made (a retry moves them if it runs elsewhere); they are small."""

    phase: str = "place"
    embeds: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    images: Any = None  # the encoded input images (image_phases.EncodedImages), for image-to-image and inpainting
    latents: torch.Tensor | None = None


def encode(
    pipe: Any, prompt: str, negative_prompt: str | None, guidance: bool, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prompt embeddings (and negative ones when guidance is on), as diffusers computes them."""
    positive, negative = pipe.encode_prompt(
        prompt=[prompt],
        device=device,
        do_classifier_free_guidance=guidance,
        negative_prompt=[negative_prompt] if guidance and negative_prompt else None,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    return list(positive), list(negative)


def denoise(
    pipe: Any,
    embeds: tuple[list[torch.Tensor], list[torch.Tensor]],
    *,
    height: int,
    width: int,
    steps: int,
    guidance_scale: float,
    seeds: Sequence[int],
    noise: torch.Tensor | None = None,
    on_step: Callable[[int, float, torch.Tensor], None] | None = None,
    device: torch.device | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    num_images: int | None = None,
    **task_arguments: Any,
) -> torch.Tensor:
    """Latents after ``steps`` transformer passes from the noise of ``seeds`` (one CPU generator per image:
    the same seed gives the same noise on every device), or from ``noise`` when it is given (see
    :func:`draw_noise`; ``seeds`` is then ignored), or drawn from ``generator`` when that is given (with
    ``num_images``, the images to make).

    ``task_arguments`` go to the pipeline as they are: ``pipe`` may be one of ``ZImagePipeline``'s siblings
    (image-to-image, inpainting), given their ``image``, ``strength`` and ``mask_image``.

    ``on_step(k, timestep, latents)`` is called after the ``k``-th step (1-based) with that step's scheduler
    timestep and the pipeline's own latents after it (not a copy: it must not modify them); whatever it raises
    ends the loop and propagates. If the loop is interrupted through diffusers' ``pipe._interrupt`` flag
    instead, diffusers skips the remaining steps and returns half-denoised latents: we raise
    :class:`~zimage_turbo.errors.GenerationInterruptedError` rather than let them be decoded.

    ``device``: the pipeline's execution device when the caller knows it (diffusers finds it by walking every
    module of every component, milliseconds of host time while the GPU may be idle).
    """
    device = device or torch.device(pipe._execution_device)
    positive, negative = ([t.to(device) for t in part] for part in embeds)
    generators = generator
    if generators is None and noise is None:
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    finished = 0

    def step_end(_pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        nonlocal finished
        finished = index + 1
        if on_step is not None:
            on_step(finished, float(timestep), tensors["latents"])
        return {}  # diffusers pops replacement tensors from what we return: none, so the latents stay its own

    latents = pipe(
        prompt_embeds=positive,
        negative_prompt_embeds=negative if guidance_scale > 0 else None,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        num_images_per_prompt=num_images or (len(seeds) if noise is None else noise.shape[0]),
        generator=generators,
        **task_arguments,
        latents=noise,
        output_type="latent",
        return_dict=False,
        callback_on_step_end=step_end,
        # only read: diffusers hands us its latents and keeps them, as we return no replacement
        callback_on_step_end_tensor_inputs=["latents"] if on_step is not None else [],
    )[0]
    planned = int(getattr(pipe, "_num_timesteps", finished))
    if finished < planned:
        raise GenerationInterruptedError(
            f"the denoising loop was interrupted after {finished} of {planned} steps (pipeline._interrupt was set); "
            "the half-denoised latents were not decoded"
        )
    return latents  # type: ignore[no-any-return]


def noise_shape(pipe: Any, images: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The shape of the initial noise ``ZImagePipeline.prepare_latents`` draws for ``images`` images."""
    scale = 2 * pipe.vae_scale_factor
    return (images, int(pipe.transformer.in_channels), 2 * (height // scale), 2 * (width // scale))


def draw_noise(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """The initial noise ``ZImagePipeline`` would draw from ``generator`` (one, or a list with one per image),
    drawn now, on the generator's own device (where diffusers draws it too before moving it), in float32.
    Passed to the pipeline as ``latents=``, it gives the image that passing ``generator=`` gives."""
    from diffusers.utils.torch_utils import randn_tensor

    device = (generator[0] if isinstance(generator, list) else generator).device
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)  # type: ignore[no-any-return]


def decode(pipe: Any, latents: torch.Tensor, device: torch.device | None = None) -> list[Any]:
    """The VAE half of ``ZImagePipeline.__call__``: latents to PIL images (``device`` as for :func:`denoise`)."""
    vae = pipe.vae
    device = device or torch.device(pipe._execution_device)
    latents = latents.to(device=device, dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    return list(pipe.image_processor.postprocess(image, output_type="pil"))


def set_vae_tiling(pipe: Any, enabled: bool) -> None:
    """Decode in overlapping tiles of 512x512 pixels (the VAE's own default tile is 1024, too big to help at
    1024x1024) or in one piece."""
    vae = pipe.vae
    if enabled:
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.tile_sample_min_size = VAE_TILE_PIXELS
        vae.tile_latent_min_size = VAE_TILE_PIXELS // scale
        vae.enable_tiling()
    else:
        vae.disable_tiling()


def count_prompt_tokens(tokenizer: Any, prompt: str) -> int:
    """Tokens the text encoder would be given for ``prompt``, chat template included, before any cut."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    return len(tokenizer(text).input_ids)


def release_memory() -> None:
    """Return freed GPU memory to the driver. Call it *after* leaving the ``except`` block: while the
    exception is being handled its traceback keeps the failed frames, and their tensors, alive."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PhaseClock:
    """Times consecutive phases without making the host wait for the GPU at each boundary.

    Construction is the first mark. On CUDA, each :meth:`mark` records an event on every device's current
    stream; :meth:`durations` waits once and reads the time between the events (the longest over devices).
    Elsewhere it is the host clock, after waiting for the device.
    """

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.cuda = [device for device in devices if device.type == "cuda"]
        self.mps = any(device.type == "mps" for device in devices)
        self.marks: list[tuple[float, list[Any]]] = []
        self.mark()

    def mark(self) -> None:
        events = []
        for device in self.cuda:
            event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        if not self.cuda and self.mps:
            torch.mps.synchronize()
        self.marks.append((time.perf_counter(), events))

    def durations(self) -> list[float]:
        """Seconds between consecutive marks."""
        if not self.cuda:
            return [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:], strict=False)]
        for event in self.marks[-1][1]:
            event.synchronize()
        return [
            max(start.elapsed_time(end) for start, end in zip(a[1], b[1], strict=True)) / 1e3
            for a, b in zip(self.marks, self.marks[1:], strict=False)
        ]
