"""What one request runs: its task's phases, in order, on the placement of one rung of the ladder.

A task is a list of phases (text-to-image: encode the prompt, denoise, decode). Each phase reads what earlier
ones left in :class:`~zimage_turbo.phases.Progress` and adds its own output, so a retry on another rung skips
the phases already done (a decode that ran out of memory does not repeat the denoising). Image-to-image and
inpainting add ``encode_image``, the VAE encoder over their input images (:mod:`~zimage_turbo.image_phases`),
and denoise through their own diffusers pipelines; so do ControlNet text-to-image and ControlNet inpainting
(:mod:`~zimage_turbo.control_phases`), whose ControlNet is a component that every placement places. The ladder
does not change.

Everything one call needs on its way down travels in a :class:`Call`, never as attributes of the Generator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from .control_phases import control_arguments, encode_control
from .errors import NumericalError, first_line
from .execution import on_device
from .failures import is_out_of_memory
from .hardware import host_peak_rss_bytes
from .image_phases import denoise_encoded, encode_images, image_arguments, noise_generators
from .phases import (
    MAX_SEQUENCE_LENGTH,
    PhaseClock,
    Progress,
    count_prompt_tokens,
    decode,
    denoise,
    draw_noise,
    encode,
    noise_shape,
    release_memory,
    set_vae_tiling,
)
from .placement import Placement
from .planner import Candidate
from .process_state import shared as process_state_shared
from .profile import Workload
from .request import GenerationRequest
from .result import Fallback, GenerationResult, StepInfo, Timings
from .speedups import SpeedupDriver

__all__ = [
    "CONTROL",
    "CONTROL_INPAINT",
    "IMAGE_TO_IMAGE",
    "INPAINT",
    "TEXT_TO_IMAGE",
    "Attempt",
    "Call",
    "phases_of",
    "result_of",
    "run_task",
]

logger = logging.getLogger(__name__)

#: the phases of a text-to-image request, in order
TEXT_TO_IMAGE = ("encode", "denoise", "decode")
#: image-to-image: the input image is encoded by the VAE before the denoising starts from it
IMAGE_TO_IMAGE = ("encode", "encode_image", "denoise", "decode")
#: inpainting: the same phases; encode_image encodes the image and the image with the mask's area blanked
INPAINT = ("encode", "encode_image", "denoise", "decode")
#: ControlNet text-to-image: encode_image encodes the control image; the ControlNet runs beside the transformer
CONTROL = ("encode", "encode_image", "denoise", "decode")
#: ControlNet inpainting: encode_image encodes the control image and the image with the mask's area blanked
CONTROL_INPAINT = ("encode", "encode_image", "denoise", "decode")
_PHASES = {
    "text_to_image": TEXT_TO_IMAGE,
    "image_to_image": IMAGE_TO_IMAGE,
    "inpaint": INPAINT,
    "control": CONTROL,
    "control_inpaint": CONTROL_INPAINT,
}


@dataclass
class Call:
    """One request's state on its way through the ladder and the phases.

    Attributes:
        fallbacks: every change of plan so far (load-time ones included), reported in the result.
        callback: the user's step callback, and ``index`` the prompt's position in the call's list.
        upcoming: predicted eager seconds per phase of the images left in the call (the compile advisor's
            "known work").
        callback_error: what the callback raised, so that the ladder never mistakes it for a failure of ours.
        noise_from: the caller's ``torch.Generator`` (or one per image) that the initial noise comes from, or
            None when it comes from the request's seeds; ``noise`` is what was drawn from it, kept so that a
            retry on another rung starts from the same noise instead of drawing again. Image-to-image and
            inpainting draw inside diffusers' pipeline instead: ``noise_states`` keeps the generators' states
            from before the first attempt, put back before a retry.
    """

    fallbacks: list[Fallback] = field(default_factory=list)
    callback: Callable[[StepInfo], None] | None = None
    index: int = 0
    upcoming: dict[str, float] = field(default_factory=dict)
    callback_error: BaseException | None = None
    noise_from: torch.Generator | list[torch.Generator] | None = None
    noise: torch.Tensor | None = None
    noise_states: list[torch.Tensor] | None = None


class Attempt(NamedTuple):
    """A rung that made the images."""

    images: list[Any]
    timings: Timings
    rung: Candidate
    peaks: dict[str, int]


def phases_of(request: GenerationRequest) -> tuple[str, ...]:
    """The phases ``request`` runs, in order."""
    return _PHASES[request.task]


def run_task(
    call: Call,
    request: GenerationRequest,
    rung: Candidate,
    progress: Progress,
    placement: Placement,
    speedups: SpeedupDriver,
    devices: Sequence[torch.device],
) -> Attempt:
    """Place the model for ``rung`` and run the phases of ``request`` not yet done; on a decode that runs out
    of memory without tiling, decode again in tiles from the same latents."""
    progress.phase = "place"
    # shared: never while another thread's load has torch's default dtype changed (process_state.py)
    with process_state_shared():
        placement.settle()
        try:
            placement.use(rung)  # outside inference mode: weights must stay ordinary tensors
        except BaseException as exc:
            if not is_out_of_memory(exc):
                placement.unsettled = True  # stopped half-way (an interrupt): remove before anything else
            raise
        with torch.inference_mode():
            return _Run(call, request, rung, progress, placement, speedups, devices).phases()


@dataclass
class _Run:
    """One rung's pass over the phases: what each phase needs, and what it found (the clock is in phases())."""

    call: Call
    request: GenerationRequest
    rung: Candidate
    progress: Progress
    placement: Placement
    speedups: SpeedupDriver
    devices: Sequence[torch.device]
    device: torch.device = field(init=False)  # where the placement computes, asked when the phases start
    finite: torch.Tensor | None = None  # whether the latents are finite, read after the decode
    # the phases this attempt runs (a retry reuses what an earlier one finished)
    ran: set[str] = field(default_factory=lambda: {"decode"})

    @property
    def pipe(self) -> Any:
        return self.placement.pipe

    def phases(self) -> Attempt:
        for device in self.devices:
            torch.cuda.reset_peak_memory_stats(device)
        active = self.placement.active
        assert active is not None
        self.device = self.placement.execution_device()
        # the attention kernel for this shape, and what is compiled when that pays off (see speedups/)
        preparing = time.perf_counter()
        self.speedups.prepare(
            self.pipe,
            self.device,
            self.placement.dtype,
            active.compilable,
            (self.request.height, self.request.width, self.call.upcoming),
            active.quantize,
            self.placement.placements,
        )
        prepared = time.perf_counter() - preparing
        # Phase boundaries are marked without waiting for the GPU (a wait between phases would leave it idle
        # while the next phase is being prepared); the marks are read once, when the images are out.
        clock = PhaseClock(self.devices)
        steps = {
            "encode": self._encode,
            "encode_image": self._encode_image,
            "denoise": self._denoise,
            "decode": self._decode,
        }
        images: list[Any] = []
        phases = phases_of(self.request)
        for phase in phases:
            images = steps[phase]() or images
            clock.mark()
        if self.finite is not None and not bool(self.finite):
            self.progress.latents = None
            raise NumericalError(
                f"the denoised latents contain NaN or infinity ({self.placement.dtype}); the image would be "
                "black. float16 does this on GPUs without bf16: use dtype='float32' or 'bfloat16'."
            )
        measured = dict(zip(phases, clock.durations(), strict=True))
        timings = Timings(**measured, prepare=prepared)
        if self.rung.vae_tiling:
            self.ran.discard("decode")  # a tiled decode (or encode) is not the workload the planner predicted
            self.ran.discard("encode_image")
        request = self.request
        predicted = self.placement.profile.compute_seconds(Workload.of(request), request.denoising_steps)
        self.speedups.finished(self.pipe, {phase: measured[phase] for phase in self.ran}, predicted)
        return Attempt(images, timings, self.rung, _peaks(self.devices))

    def _encode(self) -> None:
        if self.progress.embeds is not None:
            return
        self.ran.add("encode")
        self.progress.phase = "encode"
        request = self.request
        # each phase with its card as the current CUDA device: streaming hooks wait on its streams
        active = self.placement.active
        assert active is not None
        encode_on = active.encode_device(self.pipe, self.device)
        with on_device(encode_on):
            self.progress.embeds = encode(
                self.pipe, request.prompt, request.negative_prompt, request.guidance_scale > 0, encode_on
            )

    def _encode_image(self) -> None:
        if self.progress.images is not None:
            return
        self.ran.add("encode_image")
        self.progress.phase = "encode_image"
        request = self.request
        inputs = request.inputs
        assert inputs is not None
        with on_device(self.device):
            if inputs.control is not None:
                size = (request.height, request.width, request.num_images)
                self.progress.images = encode_control(self.pipe, inputs, *size, self.device)
            else:
                self.progress.images = encode_images(self.pipe, inputs, request.height, request.width, self.device)

    def _denoise(self) -> None:
        if self.progress.latents is not None:
            return
        self.ran.add("denoise")
        self.progress.phase = "denoise"
        request = self.request
        assert self.progress.embeds is not None
        if request.inputs is not None:
            self.progress.latents = self._denoise_images()
        else:
            with on_device(self.device):
                self.progress.latents = self._denoise_text()
        self.finite = torch.isfinite(self.progress.latents).all()  # read after the decode, which waits anyway

    def _denoise_text(self) -> torch.Tensor:
        request = self.request
        assert self.progress.embeds is not None
        return denoise(
            self.pipe,
            self.progress.embeds,
            height=request.height,
            width=request.width,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            seeds=request.seeds,
            noise=self._noise(),
            on_step=step_hook(self.call, request, self.rung),
            device=self.device,
        )

    def _denoise_images(self) -> torch.Tensor:
        call, request, progress = self.call, self.request, self.progress
        assert request.inputs is not None and progress.embeds is not None and progress.images is not None
        generator, call.noise_states = noise_generators(request.seeds, call.noise_from, call.noise_states)
        shared: dict[str, Any] = {
            "height": request.height,
            "width": request.width,
            "steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "num_images": request.num_images,
            "generator": generator,
            "on_step": step_hook(call, request, self.rung),
            "device": self.device,
        }
        inputs, encoded = request.inputs, progress.images
        if inputs.control is not None:
            arguments = control_arguments(encoded, inputs.control_scale)
        else:
            arguments = image_arguments(encoded, inputs.strength)
        with on_device(self.device):
            return denoise_encoded(self.pipe, request.task, encoded, progress.embeds, arguments, **shared)

    def _noise(self) -> torch.Tensor | None:
        """The initial noise drawn from the caller's generator(s), once per request: a retry reuses it (a
        downscaled retry needs another shape and draws again)."""
        call, request = self.call, self.request
        if call.noise_from is None:
            return None
        shape = noise_shape(self.pipe, request.num_images, request.height, request.width)
        if call.noise is None or tuple(call.noise.shape) != shape:
            call.noise = draw_noise(shape, call.noise_from)
        return call.noise

    def _decode(self) -> list[Any]:
        self.progress.phase = "decode"
        latents = self.progress.latents
        assert latents is not None
        with on_device(self.device):
            images, failure = _decode_or_none(self.pipe, latents, self.device)
        if failure is None:
            assert images is not None
            return images
        if self.rung.vae_tiling:
            raise torch.OutOfMemoryError(failure)  # tiling did not help: the ladder takes it from here
        release_memory()
        name = self.rung.name
        self.call.fallbacks.append(Fallback("vae_tiling", name, name + "+vae_tiling", "decode", failure))
        logger.warning("decoding ran out of memory; decoding again in tiles: %s", failure)
        self.rung = replace(self.rung, vae_tiling=True)
        pixels = self.request.width * self.request.height * self.request.num_images
        self.placement.tile_from = min(pixels, self.placement.tile_from or pixels)
        set_vae_tiling(self.pipe, True)
        with on_device(self.device):
            return decode(self.pipe, latents, self.device)


def step_hook(
    call: Call, request: GenerationRequest, rung: Candidate
) -> Callable[[int, float, torch.Tensor], None] | None:
    """The per-step function for ``denoise``: the user's callback with a StepInfo, its exceptions marked
    so that the ladder never mistakes one for an out-of-memory error of ours."""
    callback = call.callback
    if callback is None:
        return None

    def on_step(done: int, timestep: float, latents: torch.Tensor) -> None:
        steps = request.denoising_steps
        info = StepInfo(done, steps, request.prompt, call.index, rung.name, timestep=timestep, latents=latents)
        try:
            callback(info)
        except BaseException as exc:
            call.callback_error = exc
            raise

    return on_step


def _decode_or_none(pipe: Any, latents: torch.Tensor, device: torch.device) -> tuple[list[Any] | None, str | None]:
    """The decoded images, or on an out-of-memory error (None, its first line) *after* the except block has
    ended, so that nothing of the failed attempt stays referenced by a traceback."""
    message = None
    try:
        return decode(pipe, latents, device), None
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        message = first_line(exc)
    return None, message


def _peaks(devices: Sequence[torch.device]) -> dict[str, int]:
    peaks = {"host": host_peak_rss_bytes()}
    for device in devices:
        peaks[str(device)] = int(torch.cuda.max_memory_allocated(device))
    return peaks


def result_of(
    call: Call,
    request: GenerationRequest,
    attempt: Attempt,
    timings: Timings,
    placement: Placement,
    speedups: SpeedupDriver,
    quantization: str,
) -> GenerationResult:
    """The result of a request that ``attempt`` made, with what the caller should know in ``warnings``:
    a prompt cut at the token limit, a negative prompt without guidance, and an explicit ``quantization``
    the placement did not apply."""
    rung = attempt.rung
    predicted = {(f"cuda:{g}" if g >= 0 else "gpu"): b for g, b in rung.estimate.gpu_peak.items()}
    dtype = str(placement.dtype).removeprefix("torch.")
    warnings = []
    tokens = count_prompt_tokens(placement.pipe.tokenizer, request.prompt)
    if tokens > MAX_SEQUENCE_LENGTH:
        warnings.append(
            f"the prompt is {tokens} tokens with the chat template; the text encoder sees only the first "
            f"{MAX_SEQUENCE_LENGTH}, so the rest has no effect. Shorten it."
        )
    if request.negative_prompt is not None and request.guidance_scale == 0:
        warnings.append("negative_prompt has no effect when guidance_scale is 0")
    inputs = request.inputs
    control = inputs is not None and inputs.control is not None
    if inputs is not None:
        warnings += inputs.resized(request.height, request.width)
    # the CPU's strategy, or a strategy given as an instance, does not quantize: said, not silently dropped
    if quantization not in ("auto", "none") and rung.strategy.quantize is None:
        warnings.append(
            f"quantization={quantization!r} is set, but {rung.strategy.name} does not quantize: the weights stayed "
            f"{dtype}"
        )
    seeds: tuple[int | None, ...] = request.seeds
    if call.noise_from is not None:
        seeds = (None,) * request.num_images
        warnings.append(
            "the initial noise came from the torch.Generator given, so no seed reproduces these images "
            "(result.seeds are None); pass seed= instead for images that an int reproduces"
        )
    for warning in warnings:
        logger.warning(warning)
    return GenerationResult(
        images=tuple(attempt.images),
        prompt=request.prompt,
        seeds=seeds,
        width=request.width,
        height=request.height,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        strategy=rung.strategy.name,
        device=placement.device_name(),
        dtype=dtype,
        timings=timings,
        peak_memory=attempt.peaks,
        predicted_peak_memory=predicted,
        vae_tiling=rung.vae_tiling,
        attention=speedups.attention,
        compiled=speedups.compiled,
        quantization=rung.strategy.quantize,
        fallbacks=tuple(call.fallbacks),
        warnings=tuple(warnings),
        negative_prompt=request.negative_prompt,
        model=placement.model.name or None,
        model_revision=placement.model.revision,
        loras=placement.adapters.scales,
        task=request.task,
        strength=inputs.strength if inputs is not None and inputs.control is None else None,
        input_sizes=inputs.sizes() if inputs is not None else {},
        control_scale=inputs.control_scale if inputs is not None and control else None,
        controlnet=placement.controlnet if control else None,
    )
