"""The public entry point: a loaded Z-Image-Turbo pipeline that turns prompts into images.

    >>> from zimage_turbo import Generator
    >>> gen = Generator()                                       # doctest: +SKIP
    >>> result = gen.generate("a red fox in the snow", seed=7)  # doctest: +SKIP
    >>> result.save("fox.png")                                  # doctest: +SKIP

Loading is lazy: the model is found, checked and loaded by the first ``generate`` (or an explicit ``load()``),
and that call's ``timings.load`` says how long it took. Arguments are validated before that, so a bad
argument never costs a 20 GB load.

The Generator is the facade: it validates, locks, loads and closes. Its LoRA and ControlNet methods are in
:mod:`~zimage_turbo.generator_adapters`; loading, planning and running one request, which every public method
shares, in :mod:`~zimage_turbo.generator_core`. Below it, :mod:`~zimage_turbo.machine`
sees the hardware, :mod:`~zimage_turbo.placement` holds the loaded pipeline and the strategy applied to it,
:mod:`~zimage_turbo.ladder` climbs to a placement that needs less memory when CUDA runs out (on the same
weights, from the last finished phase), and :mod:`~zimage_turbo.tasks` runs a request's phases. Every change
of plan is reported in ``result.fallbacks``.

Threads: one Generator serializes its calls with a lock (diffusers' scheduler and tokenizer are not
thread-safe), so it can be shared between threads; calls run one after the other, each giving the image it
would give alone. Two Generators share nothing mutable (each has its own pipeline, scheduler, tokenizer and
strategy objects) and may run at the same time.

Faults: an exception raised by a ``callback`` (``KeyboardInterrupt`` included) reaches the caller unchanged;
the lock is released and the strategy's hooks are reset, so the next call works as on a fresh Generator. A
CUDA error other than out-of-memory marks the Generator unusable (:class:`~zimage_turbo.errors.DeviceFailedError`).

Several GPUs at once: give each its own Generator with ``device="cuda:N"`` (or use
:class:`~zimage_turbo.pool.GeneratorPool`, which does that).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .call_guard import CallGuard
from .errors import InvalidRequestError, InvalidSettingsError
from .generator_adapters import GeneratorAdapters
from .hardware import Hardware
from .machine import Machine, parse_device
from .phases import MAX_SEQUENCE_LENGTH, count_prompt_tokens, release_memory
from .planner import candidate_for
from .profile import Workload
from .request import (
    DEFAULT_STEPS,
    GenerationRequest,
    check_seed,
    noise_sources,
    one_spelling,
    requests_for,
    seed_or_generator,
)
from .result import GenerationResult, StepInfo
from .settings import ZImageSettings, model_name, settings_and_options
from .sources import ResolvedModel
from .speedups import SpeedupDriver
from .speedups.compile import compile_cache_dir
from .strategies import LoadStrategy, strategy_from
from .strategies.base import private_copy
from .task_inputs import DEFAULT_CONTROL_SCALE, ImageInput, task_inputs
from .tasks import Call

__all__ = ["MAX_SEQUENCE_LENGTH", "Generator", "count_prompt_tokens"]

# the keywords of Generator() that from_pretrained() passes on as they are (the rest are settings)
GENERATOR_OPTIONS = frozenset({"settings", "strategy", "load", "device", "dtype", "torch_dtype"})


class Generator(GeneratorAdapters):
    """Generates images with Z-Image-Turbo, placing the model to suit the hardware.

    Args:
        model: a repo id (``"Tongyi-MAI/Z-Image-Turbo"``) or a local folder; overrides ``settings.model``.
        settings: a :class:`~zimage_turbo.settings.ZImageSettings`; by default one is read from
            ``ZIMAGE_*`` environment variables and ``.env``.
        strategy: ``"auto"``, a strategy name, or a :class:`~zimage_turbo.strategies.LoadStrategy`
            instance; overrides ``settings.strategy``. A named strategy is tried first; when it runs out
            of memory the ladder continues below it.
        load: load the model now instead of at the first ``generate``.
        device: use only this device (``"cuda:1"``, ``"cpu"``, ``"mps"``). The planner then sees that GPU alone,
            so whatever it picks, the out-of-memory ladder included, stays on it: several Generators can share a
            machine, one per card. None (the default) plans over every visible GPU.
        dtype: overrides ``settings.dtype``: a name (``"bfloat16"``) or a ``torch.dtype`` (``torch.bfloat16``).
            ``torch_dtype`` is diffusers' spelling of the same argument; give one of the two.

    :meth:`from_pretrained` builds one the way diffusers users write it:
    ``Generator.from_pretrained("Tongyi-MAI/Z-Image-Turbo", torch_dtype=torch.bfloat16)``.

    Arguments are checked here and in each call before anything is loaded: a bad one raises a typed error
    (:class:`~zimage_turbo.errors.InvalidSettingsError`, :class:`~zimage_turbo.errors.UnknownStrategyError`,
    :class:`~zimage_turbo.errors.InvalidRequestError`) and costs no load.

    Thread safety: the methods may be called from any thread. Calls on one Generator run one at a time (a
    lock); a call from inside the Generator's own ``callback`` raises instead of waiting for itself. Two
    Generators share no mutable state (a strategy instance given to several is copied) and can run in
    parallel, memory permitting.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        settings: ZImageSettings | None = None,
        strategy: str | LoadStrategy | None = None,
        load: bool = False,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        torch_dtype: str | torch.dtype | None = None,
    ) -> None:
        if settings is not None and not isinstance(settings, ZImageSettings):
            raise InvalidSettingsError(f"settings must be a ZImageSettings, got {type(settings).__name__}")
        if dtype is not None and torch_dtype is not None:
            raise InvalidSettingsError(
                "give either dtype or torch_dtype (diffusers' name for it), not both: "
                f"dtype={dtype!r}, torch_dtype={torch_dtype!r}"
            )
        base = settings if settings is not None else ZImageSettings()
        if model is not None:
            base = base.replace(model=model_name(model))
        chosen_dtype = dtype if dtype is not None else torch_dtype
        if chosen_dtype is not None:
            base = base.replace(dtype=chosen_dtype)
        self.settings = base
        # Validate now, before any loading: None means "auto".
        self._requested = private_copy(strategy_from(strategy if strategy is not None else base.strategy))
        # a strategy given by name takes settings.quantization; an instance is used as it is
        self._requested_by_name = not isinstance(strategy, LoadStrategy)
        self._device = parse_device(device)
        self._machine = Machine(base, self._device)  # the hardware as this Generator sees it
        self._guard = CallGuard()  # one call at a time; closed; a CUDA error that poisoned the context
        self._placement = None  # from the load to close()
        self._pending = []  # what loading had to change, reported with the next result
        self._conversion = None  # writing the converted copy (converted.py)
        self._loras = ()  # what load_lora() asked for, fused into the loaded weights
        self._controlnet = None  # settings.controlnet, found and checked (headers only)
        self._speedups = SpeedupDriver(base.attention, base.compile, compile_cache_dir(base.cache_dir))
        if load:
            self.load()

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike[str], **options: Any) -> Generator:
        """A Generator for ``model``, configured as diffusers' ``from_pretrained`` is: by keyword.

        ``options`` may hold any :class:`~zimage_turbo.settings.ZImageSettings` field (``dtype="float32"``,
        ``cache_dir=...``, ``offline=True``) and any keyword of :class:`Generator` (``strategy``, ``device``,
        ``load``, ``dtype``/``torch_dtype``, ``settings``). Settings fields given here are applied on top of
        ``settings`` (or of the environment, without it). An unknown key raises
        :class:`~zimage_turbo.errors.InvalidSettingsError` listing the known ones, before anything loads.

            >>> gen = Generator.from_pretrained("folder", torch_dtype=torch.bfloat16)  # doctest: +SKIP
        """
        settings, options = settings_and_options(options, GENERATOR_OPTIONS)
        return cls(model, settings=settings, **options)

    # -- state -------------------------------------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        return self._placement is not None

    @property
    def strategy(self) -> LoadStrategy | None:
        """The strategy currently applied (None before the first generation)."""
        return None if self._placement is None else self._placement.active

    @property
    def device(self) -> torch.device | None:
        """The device this Generator is restricted to (None: it may use every visible GPU)."""
        return self._device

    @property
    def device_failure(self) -> str | None:
        """The CUDA error (other than out-of-memory) that made this Generator refuse further work, or None."""
        return self._guard.device_failure

    @property
    def hardware(self) -> Hardware | None:
        """The hardware as last seen (free memory changes between calls)."""
        return self._machine.hardware

    @property
    def model(self) -> ResolvedModel | None:
        """The resolved model folder and its source, once loaded."""
        return None if self._placement is None else self._placement.model

    @property
    def dtype(self) -> torch.dtype | None:
        return None if self._placement is None else self._placement.dtype

    @property
    def pipeline(self) -> Any:
        """The underlying diffusers ``ZImagePipeline`` (None until loaded). Changing it voids our guarantees."""
        return None if self._placement is None else self._placement.pipe

    def __repr__(self) -> str:
        if self._guard.closed:
            return "Generator(closed)"
        if self._placement is None:
            return f"Generator(model={self.settings.model!r}, not loaded)"
        placement = self._placement
        active = placement.active.name if placement.active else "none yet"
        return f"Generator(model={str(placement.model.path)!r}, strategy={active!r}, dtype={placement.dtype})"

    # -- lifecycle ---------------------------------------------------------------------------------------

    def load(self) -> Generator:
        """Find, check and load the model now (otherwise the first ``generate`` does). Returns self."""
        with self._guard.exclusive(), self._machine.current():
            self._guard.check_device()
            with self._guard.watching_device():
                self._ensure_loaded()
        return self

    def close(self) -> None:
        """Release the model and its memory. The Generator cannot be used afterwards."""
        with self._guard.exclusive():
            if self._placement is not None:
                # After a device failure every CUDA call fails: the references are just dropped.
                self._placement.release(device_usable=self._guard.device_failure is None)
            self._placement = None
            self._guard.closed = True
        release_memory()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def switch(self, strategy: str | LoadStrategy) -> None:
        """Use ``strategy`` from now on (``"auto"`` lets the planner choose again). When the model is loaded,
        the weights move at once: the current strategy is removed and the new one applied on the same
        modules, without reading anything from disk. A call running in another thread finishes first: the
        placement never changes under a generation."""
        chosen = private_copy(strategy_from(strategy))
        with self._guard.exclusive(), self._machine.current():
            self._guard.check_open()
            self._guard.check_device()
            self._requested_by_name = not isinstance(strategy, LoadStrategy)
            chosen = self._machine.quantized_variant(chosen, by_name=self._requested_by_name)
            self._requested = chosen
            placement = self._placement
            if placement is None or chosen is None:
                return
            placement.unplaceable.discard(chosen)  # named again: given another chance
            placement.broken.discard(chosen)
            hardware, reserve = placement.hardware(), self._machine.reserve_bytes
            candidate = candidate_for(chosen, placement.profile, hardware, Workload(), reserve_bytes=reserve)
            try:
                placement.use(candidate)
            except BaseException as exc:
                placement.unsettled = True  # stopped while moving weights: put everything home
                self._after_failure(exc)
                raise

    # -- generation --------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        seed: int | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | None = None,
        num_images: int | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        num_inference_steps: int | None = None,
        num_images_per_prompt: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        image: ImageInput | None = None,
        strength: float | None = None,
        mask_image: ImageInput | None = None,
        control_image: ImageInput | None = None,
        control_scale: float = DEFAULT_CONTROL_SCALE,
    ) -> GenerationResult:
        """Generate ``num_images`` images for one prompt (from an input image too, with ``image``).

        Args:
            prompt: what to draw. Up to 512 tokens (chat template included) reach the model; a longer
                prompt is cut, and the result's ``warnings`` say so.
            height: pixels, a multiple of 16 between 256 and 2048. Default 1024, or with ``image`` the image's
                height (rounded down to a multiple of 16; with only ``width`` given, the aspect ratio's).
            width: pixels, likewise: 1024, or with ``image`` the image's width.
            image: image-to-image (diffusers' ``ZImageImg2ImgPipeline``): start from this picture, a PIL image,
                a numpy array or a path, resized to ``width`` x ``height`` if it differs (the result's
                ``warnings`` say so). See docs/tasks.md.
            strength: how much of ``image`` is drawn anew, in (0, 1]: the share of the ``steps`` that run.
                Default 0.6, or 1.0 with ``mask_image`` (diffusers' defaults).
            mask_image: inpainting (``ZImageInpaintPipeline``): white pixels are drawn anew, black ones kept;
                the size of ``image``.
            control_image: condition on the ControlNet of the ``controlnet`` setting (loaded at the first such
                request): alone, ControlNet text-to-image (``ZImageControlNetPipeline``); with ``image`` and
                ``mask_image``, ControlNet inpainting (``ZImageControlNetInpaintPipeline``; no ``strength``: it
                runs every step). Resized to the output's size; by default the output takes its size.
            control_scale: what the ControlNet's hints are multiplied by (diffusers' default, 0.75), >= 0.
            steps: transformer passes. 8 (the default) is Z-Image-Turbo's official schedule, which its
                model card calls "9 steps" (the 9th was a no-op). ``num_inference_steps`` is diffusers' name
                for it: give one of the two.
            seed: image ``k`` starts from the noise of ``seed + k``; None draws a random seed (reported in
                the result).
            generator: diffusers' way of choosing the noise instead of ``seed`` (give one of the two): a
                ``torch.Generator``, or a list with one per image. The initial noise is drawn from it as
                ``ZImagePipeline`` draws it, so the image is the one diffusers makes with a generator in the
                same state. It is drawn once per prompt, before the first step: a retry after running out of
                memory reuses that noise rather than drawing more (a downscaled retry, whose noise has
                another shape, draws again). No integer reproduces such an image: the result's ``seeds``
                are None and its ``warnings`` say so.
            guidance_scale: 0 for Turbo (distilled without guidance); above 0 runs classifier-free
                guidance and doubles the transformer's work.
            negative_prompt: used only when ``guidance_scale > 0``.
            num_images: images for this prompt (1 to 16, default 1), generated as one batch.
                ``num_images_per_prompt`` is diffusers' name for it: give one of the two.
            callback: called with a :class:`~zimage_turbo.result.StepInfo` after each denoising step, in
                this thread. To stop a generation, raise from it: the exception reaches the caller
                unchanged, nothing is decoded, and the Generator stays usable.

        Raises:
            InvalidRequestError: an argument is invalid, or given under both of its names (raised before
                anything is loaded); :class:`~zimage_turbo.errors.InvalidImageError` for an input image;
                :class:`~zimage_turbo.errors.ControlNetError` for a ControlNet request without a ControlNet (or
                with one that does not fit the model), before any weight moves.
            NotEnoughMemoryError: every way of running it ran out of memory (the Generator stays usable).
            DeviceFailedError: an earlier CUDA error other than out-of-memory broke the GPU context.
        """
        if seed is not None:
            seed = check_seed(seed)  # one seed: generate_many would also take a list
        [result] = self.generate_many(
            [prompt],
            height=height,
            width=width,
            steps=steps,
            seed=seed,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            num_images=num_images,
            callback=callback,
            num_inference_steps=num_inference_steps,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            image=image,
            strength=strength,
            mask_image=mask_image,
            control_image=control_image,
            control_scale=control_scale,
        )
        return result

    def generate_many(
        self,
        prompts: Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        seed: int | Sequence[int] | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | None = None,
        num_images: int | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        num_inference_steps: int | None = None,
        num_images_per_prompt: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        image: ImageInput | None = None,
        strength: float | None = None,
        mask_image: ImageInput | None = None,
        control_image: ImageInput | None = None,
        control_scale: float = DEFAULT_CONTROL_SCALE,
    ) -> list[GenerationResult]:
        """Generate for several prompts in turn, reusing the loaded model; results keep the prompts' order.

        ``seed`` may be one int (prompt ``i`` uses ``seed + i``), one seed per prompt, or None (random
        seeds). The other arguments are those of :meth:`generate` and apply to every prompt (the
        callback's ``StepInfo.prompt_index`` says which prompt is running). Every prompt is validated
        before the first image is generated; an empty list returns an empty list without loading.

        ``generator``: one ``torch.Generator`` draws every prompt's noise in turn (prompt order); a list holds
        one per image, ``num_images`` per prompt in prompt order (``len(prompts) * num_images`` in all).

        ``image``, ``strength``, ``mask_image``, ``control_image``, ``control_scale``: every prompt starts from
        these inputs (see :meth:`generate`).
        """
        steps = one_spelling("steps", steps, "num_inference_steps", num_inference_steps, DEFAULT_STEPS)
        num_images = one_spelling("num_images", num_images, "num_images_per_prompt", num_images_per_prompt, 1)
        seed_or_generator(seed, generator)
        if callback is not None and not callable(callback):
            raise InvalidRequestError(
                f"callback must be callable (it is given a StepInfo after each step), got {type(callback).__name__}"
            )
        requests = requests_for(
            prompts,
            height=height,
            width=width,
            steps=steps,
            seed=seed,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            num_images=num_images,
            seeded=generator is None,
            inputs=(inputs := task_inputs(image, mask_image, strength, control_image, control_scale)),
        )
        sources = noise_sources(generator, len(requests), requests[0].num_images if requests else 1)
        if not requests:
            return []
        results = []
        with self._guard.exclusive(), self._machine.current():
            self._guard.check_open()
            control = self._find_controlnet(inputs.task) if inputs is not None and inputs.control is not None else None
            self._guard.check_device()
            with self._guard.watching_device():
                load_seconds = self._ensure_loaded()
                placement = self._placement
                assert placement is not None
                if control is not None and placement.controlnet is None:  # loaded with the first request using it
                    started = time.perf_counter()
                    placement.add_controlnet(control)
                    load_seconds += time.perf_counter() - started
            profile = placement.profile
            eager = [profile.compute_seconds(Workload.of(r), r.denoising_steps) for r in requests]
            for index, request in enumerate(_progress(requests, enabled=self.settings.progress and len(requests) > 1)):
                upcoming = {phase: sum(e[phase] for e in eager[index:]) for phase in eager[index]}
                call = Call(callback=callback, index=index, upcoming=upcoming, noise_from=sources[index])
                results.append(self._generate(request, load_seconds, call))
                load_seconds = 0.0
        return results


def _progress(items: list[GenerationRequest], *, enabled: bool) -> Any:
    if not enabled:
        return items
    from .progress import tqdm_class

    return tqdm_class()(items, desc="prompts", unit="prompt")
