"""The public entry point: a loaded Z-Image-Turbo pipeline that turns prompts into images.

    >>> from zimage_turbo import Generator
    >>> gen = Generator()                                       # doctest: +SKIP
    >>> result = gen.generate("a red fox in the snow", seed=7)  # doctest: +SKIP
    >>> result.save("fox.png")                                  # doctest: +SKIP

Loading is lazy: the model is found, checked and loaded by the first ``generate`` (or an explicit ``load()``),
and that call's ``timings.load`` says how long it took. Arguments are validated before that, so a bad
argument never costs a 20 GB load.

For each request the planner ranks the ways of placing the model that fit the free memory; the Generator
keeps the strategy it has while it still fits. When CUDA runs out of memory anyway, it climbs down a ladder:
leave the ``except`` block, free memory, switch to the next strategy that needs less memory in the phase
that failed (on the same weights, no reload), and carry on from the last finished phase. A decode that runs
out of memory is retried with VAE tiling on the same latents. With ``allow_downscale`` the image size is
lowered last. Every step is reported in ``result.fallbacks``.

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

import contextlib
import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from . import process_state
from .errors import (
    DeviceFailedError,
    GeneratorClosedError,
    InvalidRequestError,
    InvalidSettingsError,
    NotEnoughMemoryError,
    NumericalError,
    PlacementFailedError,
    ZImageError,
    first_line,
)
from .execution import on_device, pin_execution_device
from .failures import is_device_failure, is_out_of_memory
from .hardware import GIB, Hardware, detect_hardware, host_peak_rss_bytes
from .loader import load_pipeline, resolve_dtype
from .phases import (
    MAX_SEQUENCE_LENGTH,
    PhaseClock,
    Progress,
    count_prompt_tokens,
    decode,
    denoise,
    encode,
    release_memory,
    set_vae_tiling,
)
from .planner import Candidate, Plan, candidate_for, effective_hardware, plan, smaller_workloads
from .profile import ModelProfile, Workload
from .quantize import quantization_for, quantization_unavailable, stored_bytes
from .request import DEFAULT_STEPS, GenerationRequest, check_seed, requests_for
from .result import Fallback, GenerationResult, StepInfo, Timings
from .settings import ZImageSettings
from .sources import ResolvedModel, resolve_model
from .speedups import SpeedupDriver
from .speedups.attention import attention_available
from .speedups.compile import compile_cache_dir
from .strategies import FullGPU, Hybrid, LoadStrategy, StreamedOffload, strategy_from
from .strategies.base import components, host_homes, new_host_homes, send_everything_home

__all__ = ["MAX_SEQUENCE_LENGTH", "Generator", "count_prompt_tokens"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Loaded:
    pipe: Any
    model: ResolvedModel
    profile: ModelProfile
    dtype: torch.dtype
    # the strategy whose load device the weights went to; None once they are back in their host homes
    loaded_for: LoadStrategy | None


class Generator:
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
    ) -> None:
        if settings is not None and not isinstance(settings, ZImageSettings):
            raise InvalidSettingsError(f"settings must be a ZImageSettings, got {type(settings).__name__}")
        base = settings if settings is not None else ZImageSettings()
        if model is not None:
            base = base.replace(model=_model_name(model))
        self.settings = base
        # Validate now, before any loading: None means "auto".
        self._requested: LoadStrategy | None = _own(strategy_from(strategy if strategy is not None else base.strategy))
        # a strategy given by name takes settings.quantization; an instance is used as it is
        self._requested_by_name = not isinstance(strategy, LoadStrategy)
        self._device = _parse_device(device)
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self._active: LoadStrategy | None = None
        self._hardware: Hardware | None = None
        self._pending: list[Fallback] = []  # what loading had to change, reported with the next result
        self._unplaceable: set[LoadStrategy] = set()  # strategies whose weights did not fit when placed
        # strategies that failed on their first use for a reason other than memory, and those that have worked
        self._broken: set[LoadStrategy] = set()
        self._proven: set[LoadStrategy] = set()
        self._tile_from: int | None = None  # pixels from which the strategy in use needed a tiled decode
        self._held: dict[int, int] | None = None  # _held_bytes() of the placement in use
        self._closed = False
        self._owner: int | None = None  # the thread holding the lock
        self._device_failure: str | None = None  # a CUDA error that poisoned the context, once met
        # True when an exception interrupted a placement: the strategy in use may be half-applied
        self._unsettled = False
        self._callback: Callable[[StepInfo], None] | None = None  # of the generation running now
        self._callback_index = 0
        self._callback_error: BaseException | None = None  # what that callback raised, if anything
        self._accelerator = SpeedupDriver(base.attention, base.compile, compile_cache_dir(base.cache_dir))
        # the quantization the planner may use (None: lossless only), and whether lossless placements rank first
        self._quantize: str | None = None
        self._prefer_lossless = True
        # (id of the pipeline, its execution device) under the placement in use; None: not known yet
        self._execution_device: tuple[int, torch.device] | None = None
        self._placements = 0  # counts placements (the speed-ups re-check hooks after each)
        self._upcoming: dict[str, float] = {}  # predicted eager seconds per phase of the images left in the call
        if load:
            self.load()

    # -- state -------------------------------------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    @property
    def strategy(self) -> LoadStrategy | None:
        """The strategy currently applied (None before the first generation)."""
        return self._active

    @property
    def device(self) -> torch.device | None:
        """The device this Generator is restricted to (None: it may use every visible GPU)."""
        return self._device

    @property
    def device_failure(self) -> str | None:
        """The CUDA error (other than out-of-memory) that made this Generator refuse further work, or None."""
        return self._device_failure

    @property
    def hardware(self) -> Hardware | None:
        """The hardware as last seen (free memory changes between calls)."""
        return self._hardware

    @property
    def model(self) -> ResolvedModel | None:
        """The resolved model folder and its source, once loaded."""
        return None if self._loaded is None else self._loaded.model

    @property
    def dtype(self) -> torch.dtype | None:
        return None if self._loaded is None else self._loaded.dtype

    @property
    def pipeline(self) -> Any:
        """The underlying diffusers ``ZImagePipeline`` (None until loaded). Changing it voids our guarantees."""
        return None if self._loaded is None else self._loaded.pipe

    def __repr__(self) -> str:
        if self._closed:
            return "Generator(closed)"
        if self._loaded is None:
            return f"Generator(model={self.settings.model!r}, not loaded)"
        active = self._active.name if self._active else "none yet"
        return f"Generator(model={str(self._loaded.model.path)!r}, strategy={active!r}, dtype={self._loaded.dtype})"

    # -- lifecycle ---------------------------------------------------------------------------------------

    def load(self) -> Generator:
        """Find, check and load the model now (otherwise the first ``generate`` does). Returns self."""
        with self._exclusive(), self._on_device():
            self._check_device()
            with self._watching_device():
                self._ensure_loaded()
        return self

    def close(self) -> None:
        """Release the model and its memory. The Generator cannot be used afterwards."""
        with self._exclusive():
            if self._loaded is not None:
                # After a device failure every CUDA call fails: just drop the references.
                if self._active is not None and self._device_failure is None:
                    self._active.remove(self._loaded.pipe)
                host_homes(self._loaded.pipe).clear()
            self._loaded = None
            self._active = None
            self._execution_device = None
            self._closed = True
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
        chosen = _own(strategy_from(strategy))
        with self._exclusive(), self._on_device():
            self._check_open()
            self._check_device()
            self._requested_by_name = not isinstance(strategy, LoadStrategy)
            chosen = self._quantized_variant(chosen)
            self._requested = chosen
            self._unplaceable.discard(chosen)
            self._broken.discard(chosen)
            if self._loaded is None or chosen is None:
                return
            hardware = effective_hardware(self._detect(), self._held_bytes())
            candidate = candidate_for(chosen, self._loaded.profile, hardware, Workload())
            try:
                self._use(candidate)
            except BaseException as exc:
                self._unsettled = True  # stopped while moving weights: put everything home
                self._after_failure(exc)
                raise

    # -- planning ----------------------------------------------------------------------------------------

    def plan(
        self,
        *,
        height: int = 1024,
        width: int = 1024,
        steps: int = DEFAULT_STEPS,
        num_images: int = 1,
        guidance_scale: float = 0.0,
    ) -> Plan:
        """How a request of this shape would be placed, without generating (and without loading weights:
        sizes come from the safetensors headers)."""
        request = GenerationRequest(
            prompt="plan", height=height, width=width, steps=steps, num_images=num_images, guidance_scale=guidance_scale
        )
        with self._exclusive():
            self._check_open()
            profile = self._loaded.profile if self._loaded else self._profile_without_loading()
            return self._plan(profile, request)

    def _profile_without_loading(self) -> ModelProfile:
        return self._read_model()[2]

    def _read_model(self) -> tuple[ResolvedModel, torch.dtype, ModelProfile]:
        """Resolve the model and read its sizes (headers only) at the dtype it will run in here."""
        model = resolve_model(self.settings)
        device = self._first_device(self._detect())
        dtype = self._dtype_for(device)
        self._resolve_quantization(device)  # plan() shows the quantized rungs before loading too
        return model, dtype, ModelProfile.from_layout(model.layout, dtype_bytes=dtype.itemsize)

    def _plan(self, profile: ModelProfile, request: GenerationRequest | Workload) -> Plan:
        hardware = effective_hardware(self._detect(), self._held_bytes())
        return plan(
            profile,
            hardware,
            request,
            reserve_gib=self.settings.vram_reserve_gib,
            quantize=self._quantize,
            prefer_lossless=self._prefer_lossless,
        )

    def _check_attention(self, device: torch.device) -> None:
        """A forced attention kernel must run here: say so before loading 20 GB, not at the first image."""
        name = self.settings.attention
        reason = "" if name == "auto" else attention_available(name, device)
        if reason:
            raise InvalidSettingsError(f"attention={name!r} cannot run on {device}: {reason}")

    def _resolve_quantization(self, device: torch.device) -> None:
        """What ``settings.quantization`` means on ``device``: an explicit kind must be possible there (else a
        clear error before loading); ``"auto"`` quietly means lossless only where torchao is missing."""
        setting = self.settings.quantization
        if setting == "none":
            return
        kind = quantization_for(device) if setting == "auto" else setting
        reason = quantization_unavailable(kind, device)
        if reason and setting != "auto":
            raise InvalidSettingsError(f"quantization={setting!r} cannot run on {device}: {reason}")
        if reason:
            logger.info("quantization='auto' stays lossless here: %s", reason)
            return
        self._quantize, self._prefer_lossless = kind, setting == "auto"
        self._requested = self._quantized_variant(self._requested)

    def _quantized_variant(self, strategy: LoadStrategy | None) -> LoadStrategy | None:
        """With an explicit ``quantization``, ``strategy="full_gpu"`` (``"hybrid"``, ``"streamed"``) by name means its
        quantized variant; instances, and every strategy under ``"auto"`` or ``"none"``, stay as they are."""
        kind = self._quantize
        if kind is None or self._prefer_lossless or not self._requested_by_name:
            return strategy
        if isinstance(strategy, FullGPU) and strategy.quantize is None:
            return FullGPU(device=strategy.device, quantize=kind)
        if isinstance(strategy, (Hybrid, StreamedOffload)) and strategy.quantize is None:
            return type(strategy)(device=strategy.device, record_stream=strategy.record_stream, quantize=kind)
        return strategy

    def _detect(self) -> Hardware:
        budget = self.settings.vram_budget_gib
        hardware = detect_hardware(vram_budget_bytes=None if budget is None else int(budget * GIB))
        self._hardware = hardware if self._device is None else hardware.restricted_to(self._device)
        return self._hardware

    def _held_bytes(self) -> dict[int, int]:
        """Bytes of our own weights on each GPU (the planner may count them as free: we can move them).

        Counted once per placement (walking every tensor of the pipeline takes milliseconds, on every call)."""
        if self._held is not None:
            return self._held
        held: dict[int, int] = {}
        if self._loaded is None:
            return held
        for module in components(self._loaded.pipe).values():
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.device.type == "cuda":
                    index = tensor.device.index or 0
                    held[index] = held.get(index, 0) + stored_bytes(tensor)
        if self._active is not None:
            self._held = held
        return held

    def _first_device(self, hardware: Hardware) -> torch.device:
        if hardware.gpus:
            return torch.device("cuda", max(hardware.gpus, key=lambda g: g.free_bytes).index)
        return torch.device("mps" if hardware.mps else "cpu")

    def _dtype_for(self, device: torch.device) -> torch.dtype:
        assert self._hardware is not None
        return resolve_dtype(self.settings.dtype, device, self._hardware)

    # -- loading -----------------------------------------------------------------------------------------

    def _ensure_loaded(self) -> float:
        """Load if needed; return the seconds spent loading (0 when already loaded)."""
        self._check_open()
        if self._loaded is not None:
            return 0.0
        started = time.perf_counter()
        model, dtype, profile = self._read_model()
        hardware = self._hardware
        assert hardware is not None
        self._check_attention(self._first_device(hardware))
        first = self._first_candidate(profile, hardware)
        targets = first.strategy.load_targets(hardware)
        where = ", ".join(f"{name} to {target}" for name, target in targets.items()) or "everything to host memory"
        logger.info("loading %s (%s) for %s, %s: %s", model.path, model.source, first.name, dtype, where)
        pipe, placed = self._load_to(model, dtype, targets)
        loaded_for = first.strategy if placed else None  # None: the weights landed in host memory instead
        self._loaded = _Loaded(pipe=pipe, model=model, profile=profile, dtype=dtype, loaded_for=loaded_for)
        # Place the weights now, so that a loaded Generator is ready; if that runs out of memory, the first
        # generation's ladder takes over.
        failure, memory = self._try_placing(first)
        if failure is not None:
            release_memory()
            self._pending.append(Fallback("strategy" if memory else "error", first.name, "", "place", failure))
            (self._unplaceable if memory else self._broken).add(first.strategy)
            self._leave_active()
            release_memory()
        seconds = time.perf_counter() - started
        logger.info("loaded in %.1f s", seconds)
        return seconds

    def _try_placing(self, rung: Candidate) -> tuple[str | None, bool]:
        """Apply ``rung``; on failure (its message, whether memory ran out), *after* the except block."""
        message = None
        try:
            self._use(rung)
            return None, True
        except Exception as exc:
            if not is_out_of_memory(exc) and not self._placement_failed(rung, exc):
                raise
            memory, message = is_out_of_memory(exc), _failure_text(exc)
        return message, memory

    def _placement_failed(self, rung: Candidate, exc: BaseException) -> bool:
        """Whether ``exc`` (not an out-of-memory error) counts against the placement rather than the caller: the
        placement has not produced an image yet in this Generator (a device mismatch, a kernel that cannot run
        on that card), and nothing says otherwise (our own errors, the user's callback, a CUDA error that
        poisoned the context and rules out any retry)."""
        return (
            rung.strategy not in self._proven
            and exc is not self._callback_error
            and not isinstance(exc, ZImageError)
            and not is_device_failure(exc)
        )

    def _first_candidate(self, profile: ModelProfile, hardware: Hardware) -> Candidate:
        """The requested strategy, or what 'auto' picks for a 1024x1024 image: the best fit, else the
        candidate needing the least memory."""
        if self._requested is not None:
            return candidate_for(self._requested, profile, hardware, Workload())
        ranked = plan(
            profile,
            hardware,
            Workload(),
            reserve_gib=self.settings.vram_reserve_gib,
            quantize=self._quantize,
            prefer_lossless=self._prefer_lossless,
        )
        return ranked.best or ranked.candidates[0]

    def _load_to(
        self, model: ResolvedModel, dtype: torch.dtype, targets: dict[str, torch.device | str]
    ) -> tuple[Any, bool]:
        """Load with each component at its target; if that runs out of GPU memory, load everything into host
        memory instead. Returns the pipeline and whether the targets were met."""
        failure = ""
        try:
            return self._load_with(model, dtype, targets), True
        except torch.OutOfMemoryError as exc:
            if not targets:
                raise
            failure = first_line(exc)
        release_memory()  # outside the except block, so that the half-loaded weights can really be freed
        where = ", ".join(sorted({str(target) for target in targets.values()}))
        self._pending.append(Fallback("load", where, "cpu", "load", f"out of memory loading onto {where}: {failure}"))
        logger.warning("out of memory loading onto %s; loading into host memory instead", where)
        return self._load_with(model, dtype, {}), False

    def _load_with(self, model: ResolvedModel, dtype: torch.dtype, targets: dict[str, torch.device | str]) -> Any:
        homes = new_host_homes()
        pipe = load_pipeline(model.layout, dtype=dtype, targets=targets, homes=homes, progress=self.settings.progress)
        host_homes(pipe, homes)
        return pipe

    # -- generation --------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        height: int = 1024,
        width: int = 1024,
        steps: int = DEFAULT_STEPS,
        seed: int | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | None = None,
        num_images: int = 1,
        callback: Callable[[StepInfo], None] | None = None,
    ) -> GenerationResult:
        """Generate ``num_images`` images for one prompt.

        Args:
            prompt: what to draw. Up to 512 tokens (chat template included) reach the model; a longer
                prompt is cut, and the result's ``warnings`` say so.
            height, width: pixels, multiples of 16 between 256 and 2048.
            steps: transformer passes. 8 (the default) is Z-Image-Turbo's official schedule, which its
                model card calls "9 steps" (the 9th was a no-op).
            seed: image ``k`` starts from the noise of ``seed + k``; None draws a random seed (reported in
                the result).
            guidance_scale: 0 for Turbo (distilled without guidance); above 0 runs classifier-free
                guidance and doubles the transformer's work.
            negative_prompt: used only when ``guidance_scale > 0``.
            num_images: images for this prompt (1 to 16), generated as one batch.
            callback: called with a :class:`~zimage_turbo.result.StepInfo` after each denoising step, in
                this thread. To stop a generation, raise from it: the exception reaches the caller
                unchanged, nothing is decoded, and the Generator stays usable.

        Raises:
            InvalidRequestError: an argument is invalid (raised before anything is loaded).
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
        )
        return result

    def generate_many(
        self,
        prompts: Sequence[str],
        *,
        height: int = 1024,
        width: int = 1024,
        steps: int = DEFAULT_STEPS,
        seed: int | Sequence[int] | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | None = None,
        num_images: int = 1,
        callback: Callable[[StepInfo], None] | None = None,
    ) -> list[GenerationResult]:
        """Generate for several prompts in turn, reusing the loaded model; results keep the prompts' order.

        ``seed`` may be one int (prompt ``i`` uses ``seed + i``), one seed per prompt, or None (random
        seeds). The other arguments are those of :meth:`generate` and apply to every prompt (the
        callback's ``StepInfo.prompt_index`` says which prompt is running). Every prompt is validated
        before the first image is generated; an empty list returns an empty list without loading.
        """
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
        )
        if not requests:
            return []
        results = []
        with self._exclusive(), self._on_device():
            self._check_device()
            with self._watching_device():
                load_seconds = self._ensure_loaded()
            assert self._loaded is not None
            profile = self._loaded.profile
            eager = [profile.compute_seconds(Workload.of(r), r.steps) for r in requests]
            for index, request in enumerate(_progress(requests, enabled=self.settings.progress and len(requests) > 1)):
                self._upcoming = {phase: sum(e[phase] for e in eager[index:]) for phase in eager[index]}
                results.append(self._generate(request, load_seconds, callback, index))
                load_seconds = 0.0
        return results

    # -- locking and faults ------------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the lock for one call. A call from inside this Generator's own callback (same thread, lock
        held) is refused instead of waiting forever for itself."""
        me = threading.get_ident()
        if self._owner == me:
            raise InvalidRequestError(
                "this Generator was called from inside its own callback, which runs while it generates; the call "
                "would wait for itself. Make the call after generate() returns."
            )
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def _check_open(self) -> None:
        if self._closed:
            raise GeneratorClosedError("this Generator was closed; create a new one")

    def _check_device(self) -> None:
        if self._device_failure is not None:
            raise DeviceFailedError(
                f"this Generator met a CUDA error that was not out-of-memory ({self._device_failure}); such "
                "errors leave the process's CUDA context unusable, so it refuses further work. Restart the process."
            )

    @contextmanager
    def _watching_device(self) -> Iterator[None]:
        """Remember a context-poisoning CUDA error raised inside, then let it propagate unchanged."""
        try:
            yield
        except BaseException as exc:
            if is_device_failure(exc):
                self._device_failure = f"{type(exc).__name__}: {first_line(exc)}"
            raise

    def _after_failure(self, exc: BaseException) -> None:
        """An exception is leaving a call: leave the placement as a fresh ``apply()`` would, or nothing
        applied. diffusers resets no offload hooks after an exception, and a forward stopped half-way leaves
        streamed blocks on the device; the next call must not inherit either."""
        if is_device_failure(exc):
            self._device_failure = f"{type(exc).__name__}: {first_line(exc)}"
            logger.error("CUDA error; this Generator refuses further work: %s", self._device_failure)
            return
        if self._loaded is None or self._active is None:
            self._unsettled = False
            return
        try:
            if self._unsettled or self._active in self._unplaceable | self._broken:
                self._leave_active()  # half-placed: every weight home; the next call applies afresh
            elif self._active.offloads:
                self._reapply()
            self._unsettled = False
        except Exception as problem:  # the original exception matters more; the next call cleans up
            self._unsettled = True
            logger.warning("could not reset %s after %s: %s", self._active, type(exc).__name__, problem)

    def _reapply(self) -> None:
        """Remove and apply the strategy in use again on the same weights: fresh hooks, streamed weights back
        in their homes; components it keeps resident stay where they are (nothing is copied)."""
        assert self._loaded is not None and self._active is not None
        strategy = self._active
        hardware = effective_hardware(self._detect(), self._held_bytes())
        strategy.remove(self._loaded.pipe, list(strategy.resident(hardware)))
        self._forget_execution_device()
        strategy.apply(self._loaded.pipe, hardware)

    def _step_hook(self, request: GenerationRequest, rung: Candidate) -> Callable[[int], None] | None:
        """The per-step function for ``denoise``: the user's callback with a StepInfo, its exceptions marked
        so that the ladder never mistakes one for an out-of-memory error of ours."""
        callback = self._callback
        if callback is None:
            return None
        index = self._callback_index

        def on_step(done: int) -> None:
            info = StepInfo(done, request.steps, request.prompt, index, rung.name)
            try:
                callback(info)
            except BaseException as exc:
                self._callback_error = exc
                raise

        return on_step

    # -- the ladder --------------------------------------------------------------------------------------

    def _generate(
        self,
        request: GenerationRequest,
        load_seconds: float,
        callback: Callable[[StepInfo], None] | None = None,
        index: int = 0,
    ) -> GenerationResult:
        """One request, with its callback; on any exception, the Generator is left usable (or, after a CUDA
        error that poisons the context, marked unusable) before the exception propagates unchanged."""
        self._callback, self._callback_index = callback, index
        try:
            return self._ladder(request, load_seconds)
        except BaseException as exc:
            self._after_failure(exc)
            raise
        finally:
            self._callback = None
            self._callback_error = None

    def _ladder(self, request: GenerationRequest, load_seconds: float) -> GenerationResult:
        """One request through the ladder, and then, if allowed, at smaller sizes."""
        fallbacks: list[Fallback] = self._pending
        self._pending = []
        started = time.perf_counter()
        attempt = self._climb(request, fallbacks)
        if attempt is None and self.settings.allow_downscale and _memory_was_short(fallbacks):
            assert self._loaded is not None
            for smaller in smaller_workloads(Workload.of(request)):
                shrunk = replace(request, height=smaller.height, width=smaller.width)
                fallbacks.append(
                    Fallback(
                        "downscale",
                        f"{request.width}x{request.height}",
                        f"{shrunk.width}x{shrunk.height}",
                        "plan",
                        "nothing fitted at the requested size (allow_downscale is on)",
                    )
                )
                attempt = self._climb(shrunk, fallbacks)
                if attempt is not None:
                    request = shrunk
                    break
        if attempt is None:
            raise self._out_of_rungs(request, fallbacks)
        images, timings, rung, peaks = attempt
        timings = replace(timings, load=load_seconds, recovery=time.perf_counter() - started - timings.work)
        return self._result(request, images, timings, rung, peaks, fallbacks)

    def _climb(
        self, request: GenerationRequest, fallbacks: list[Fallback]
    ) -> tuple[list[Any], Timings, Candidate, dict[str, int]] | None:
        """Try the rungs for ``request`` in order; None when every one ran out of memory."""
        assert self._loaded is not None
        ranked = self._plan(self._loaded.profile, request)
        progress = Progress()
        failed: Candidate | None = None
        failed_phase = ""
        for rung in self._rungs(ranked):
            if failed is not None and not _needs_less(rung, failed, failed_phase):
                continue
            outcome, failure, memory = self._attempt_rung(request, rung, progress, fallbacks)
            if failure is None:
                assert outcome is not None
                self._proven.add(rung.strategy)
                return outcome
            release_memory()  # we are out of the except block: the failed frames are gone
            if not memory:
                # A bug of that placement on this machine: say so loudly, never use it again here, and let the
                # next rung (on the same weights, all of them sent home first) make the image.
                fallbacks.append(Fallback("error", rung.name, "", progress.phase, failure))
                self._broken.add(rung.strategy)
                self._unsettled = True
                logger.warning(
                    "%s failed on its first use while %s, so this Generator will not use it again; trying the next "
                    "placement. Please report it: %s",
                    rung.name,
                    _doing(progress.phase),
                    failure,
                )
                continue
            fallbacks.append(Fallback("strategy", rung.name, "", progress.phase, failure))
            if progress.phase == "place":
                self._unplaceable.add(rung.strategy)
            logger.warning("%s ran out of memory while %s: %s", rung.name, _doing(progress.phase), failure)
            failed, failed_phase = rung, progress.phase  # the next rung's _use() moves the weights
        return None

    def _attempt_rung(
        self, request: GenerationRequest, rung: Candidate, progress: Progress, fallbacks: list[Fallback]
    ) -> tuple[tuple[list[Any], Timings, Candidate, dict[str, int]] | None, str | None, bool]:
        """``self._run(...)``, or why it failed and whether memory ran out, *after* the except block. What the
        user's callback raised is passed on unchanged, even an out-of-memory error: it is the caller's, not a
        reason to change strategy; so is any other error that does not count against the placement."""
        message = None
        try:
            return self._run(request, rung, progress, fallbacks), None, True
        except Exception as exc:
            memory = exc is not self._callback_error and is_out_of_memory(exc)
            if not memory and not self._placement_failed(rung, exc):
                raise
            message = _failure_text(exc) if not memory else first_line(exc)
        return None, message, memory

    def _rungs(self, ranked: Plan) -> list[Candidate]:
        """The order to try: the requested strategy or the one in use if it still fits, else the plan's best;
        then every other candidate that fits; then, if none fits, the one needing least memory."""
        assert self._loaded is not None
        first: Candidate | None = None
        keep = self._active or self._requested
        if keep is not None:
            # A decode that needed tiles at this size under the strategy in use will need them again.
            work = ranked.workload
            tiled = work.vae_tiling or (
                keep is self._active and self._tile_from is not None and work.pixels * work.images >= self._tile_from
            )
            for candidate in ranked.candidates:
                if candidate.strategy == keep and candidate.vae_tiling == tiled:
                    first = candidate
                    break
            else:
                first = candidate_for(keep, self._loaded.profile, ranked.hardware, ranked.workload, steps=ranked.steps)
            if keep is not self._requested and not first.fits:
                first = None  # the strategy in use no longer fits this request: re-plan
        rungs = [first] if first is not None else []
        rungs += [c for c in ranked.fitting if c not in rungs]
        if not ranked.fitting:
            least = min(ranked.candidates, key=lambda c: c.peak_bytes)
            if least not in rungs:
                rungs.append(least)
        # A strategy whose weights did not fit on the card will not fit now either (the model has not shrunk).
        return [rung for rung in rungs if rung.strategy not in self._unplaceable | self._broken]

    def _use(self, rung: Candidate) -> None:
        """Make ``rung`` the applied strategy (switching on the same weights) and set VAE tiling.

        Components that both the old and the new strategy keep resident on the same GPU stay there: a
        fallback from full_gpu to hybrid moves only the text encoder."""
        assert self._loaded is not None and self._hardware is not None
        pipe = self._loaded.pipe
        if self._active != rung.strategy:
            hardware = effective_hardware(self._detect(), self._held_bytes())
            wanted = rung.strategy.resident(hardware)
            self._leave_active(wanted)
            if self._loaded.loaded_for is not None and rung.strategy != self._loaded.loaded_for:
                send_everything_home(pipe)  # weights were loaded straight to a GPU for another strategy
            self._loaded.loaded_for = None
            logger.info("placing the model: %s", rung.strategy.name)
            self._held = None
            self._active = rung.strategy
            self._forget_execution_device()
            self._tile_from = None
            rung.strategy.apply(pipe, hardware)
        set_vae_tiling(pipe, rung.vae_tiling)

    def _forget_execution_device(self) -> None:
        """The placement changed: the execution device is asked again (and pinned) before the next phase."""
        if self._execution_device is not None and self._loaded is not None:
            pin_execution_device(self._loaded.pipe, None)
        self._execution_device = None

    def _leave_active(self, wanted: dict[str, torch.device] | None = None) -> None:
        """Remove the applied strategy, keeping in place the components ``wanted`` resident where they are."""
        if self._loaded is None or self._active is None:
            return
        keep: list[str] = []
        if wanted and self._hardware is not None:
            held = self._active.resident(self._hardware)
            keep = [name for name, device in held.items() if wanted.get(name) == device]
        self._active.remove(self._loaded.pipe, keep)
        self._active = None
        self._forget_execution_device()
        self._held = None
        self._loaded.loaded_for = None

    def _run(
        self, request: GenerationRequest, rung: Candidate, progress: Progress, fallbacks: list[Fallback]
    ) -> tuple[list[Any], Timings, Candidate, dict[str, int]]:
        """Place the model for ``rung`` and run the phases not yet done; on a decode that runs out of memory
        without tiling, retry the decode with tiling from the same latents."""
        progress.phase = "place"
        # shared: never while another thread's load has torch's default dtype changed (process_state.py)
        with process_state.shared():
            if self._unsettled:  # an earlier call was stopped while weights moved, and could not clean up
                self._leave_active()
                self._unsettled = False
            try:
                self._use(rung)  # outside inference mode: weights must stay ordinary tensors
            except BaseException as exc:
                if not is_out_of_memory(exc):
                    self._unsettled = True  # stopped half-way (an interrupt): remove before anything else
                raise
            with torch.inference_mode():
                return self._phases(request, rung, progress, fallbacks)

    def _phases(
        self, request: GenerationRequest, rung: Candidate, progress: Progress, fallbacks: list[Fallback]
    ) -> tuple[list[Any], Timings, Candidate, dict[str, int]]:
        assert self._loaded is not None
        pipe = self._loaded.pipe
        devices = self._gpu_devices()
        _reset_peaks(devices)
        guidance = request.guidance_scale > 0
        assert self._active is not None
        # Where the placement computes, asked once per placement and pinned on the pipeline: diffusers would
        # walk every module on each call, and names the wrong card when components sit on different ones.
        if self._execution_device is None or self._execution_device[0] != id(pipe):
            pin_execution_device(pipe, None)
            self._execution_device = (id(pipe), self._active.execution_device(pipe))
            pin_execution_device(pipe, self._execution_device[1])
            self._placements += 1
        device = self._execution_device[1]
        # the attention kernel for this shape, and what is compiled when that pays off (see acceleration.py)
        self._accelerator.prepare(
            pipe,
            device,
            self._loaded.dtype,
            self._active.compilable,
            (request.height, request.width, self._upcoming),
            self._active.quantize,
            self._placements,
        )

        # Phase boundaries are marked without waiting for the GPU (a wait between phases would leave it idle
        # while the next phase is being prepared); the marks are read once, when the images are out.
        clock = PhaseClock(devices)
        ran = {"decode"}  # the phases this attempt runs (a retry reuses what an earlier one finished)
        if progress.embeds is None:
            ran.add("encode")
            progress.phase = "encode"
            # each phase with its card as the current CUDA device: streaming hooks wait on its streams
            encode_on = self._active.encode_device(pipe, device)
            with on_device(encode_on):
                progress.embeds = encode(pipe, request.prompt, request.negative_prompt, guidance, encode_on)
        clock.mark()
        finite: torch.Tensor | None = None
        if progress.latents is None:
            ran.add("denoise")
            progress.phase = "denoise"
            with on_device(device):
                progress.latents = denoise(
                    pipe,
                    progress.embeds,
                    height=request.height,
                    width=request.width,
                    steps=request.steps,
                    guidance_scale=request.guidance_scale,
                    seeds=request.seeds,
                    on_step=self._step_hook(request, rung),
                    device=device,
                )
            finite = torch.isfinite(progress.latents).all()  # read after the decode, which waits anyway
        clock.mark()
        progress.phase = "decode"
        latents = progress.latents
        assert latents is not None
        with on_device(device):
            images, failure = _attempt(decode, pipe, latents, device)
        if failure is not None:
            if rung.vae_tiling:
                raise torch.OutOfMemoryError(failure)  # tiling did not help: the ladder takes it from here
            release_memory()
            fallbacks.append(Fallback("vae_tiling", rung.name, rung.name + "+vae_tiling", "decode", failure))
            logger.warning("decoding ran out of memory; decoding again in tiles: %s", failure)
            rung = replace(rung, vae_tiling=True)
            pixels = request.width * request.height * request.num_images
            self._tile_from = min(pixels, self._tile_from or pixels)
            set_vae_tiling(pipe, True)
            with on_device(device):
                images = decode(pipe, latents, device)
        clock.mark()
        if finite is not None and not bool(finite):
            progress.latents = None
            raise NumericalError(
                f"the denoised latents contain NaN or infinity ({self._loaded.dtype}); the image would be "
                "black. float16 does this on GPUs without bf16: use dtype='float32' or 'bfloat16'."
            )
        assert images is not None
        encode_s, denoise_s, decode_s = clock.durations()
        timings = Timings(encode=encode_s, denoise=denoise_s, decode=decode_s)
        if rung.vae_tiling:
            ran.discard("decode")  # a tiled decode is not the workload the planner predicted
        predicted = self._loaded.profile.compute_seconds(Workload.of(request), request.steps)
        measured = {"encode": encode_s, "denoise": denoise_s, "decode": decode_s}
        self._accelerator.finished(pipe, {phase: measured[phase] for phase in ran}, predicted)
        return images, timings, rung, _peaks(devices)

    def _on_device(self) -> contextlib.AbstractContextManager[object]:
        """Make this Generator's GPU the thread's current CUDA device while it works: streams and hooks made
        without an explicit device (diffusers' group offloading among them) land on the current one."""
        if self._device is not None and self._device.type == "cuda" and torch.cuda.is_available():
            return torch.cuda.device(self._device)
        return contextlib.nullcontext()

    def _gpu_devices(self) -> list[torch.device]:
        """The GPUs this Generator may use: where it measures peaks and waits for work to finish (never another
        Generator's card, whose work would then be timed as ours)."""
        assert self._hardware is not None
        return [torch.device("cuda", g.index) for g in self._hardware.gpus]

    def _result(
        self,
        request: GenerationRequest,
        images: list[Any],
        timings: Timings,
        rung: Candidate,
        peaks: dict[str, int],
        fallbacks: list[Fallback],
    ) -> GenerationResult:
        assert self._loaded is not None
        warnings = self._prompt_warnings(request)
        predicted = {(f"cuda:{g}" if g >= 0 else "gpu"): b for g, b in rung.estimate.gpu_peak.items()}
        return GenerationResult(
            images=tuple(images),
            prompt=request.prompt,
            seeds=request.seeds,
            width=request.width,
            height=request.height,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            strategy=rung.strategy.name,
            device=str(self._execution_device[1] if self._execution_device else self._loaded.pipe._execution_device),
            dtype=str(self._loaded.dtype).removeprefix("torch."),
            timings=timings,
            peak_memory=peaks,
            predicted_peak_memory=predicted,
            vae_tiling=rung.vae_tiling,
            attention=self._accelerator.attention,
            compiled=self._accelerator.compiled,
            quantization=rung.strategy.quantize,
            fallbacks=tuple(fallbacks),
            warnings=tuple(warnings + self._quantization_warnings(rung)),
        )

    def _quantization_warnings(self, rung: Candidate) -> list[str]:
        """An explicit ``quantization`` that the placement used did not apply (the CPU's strategy, a strategy
        given as an instance) is said, not silently dropped."""
        setting = self.settings.quantization
        if setting in ("auto", "none") or rung.strategy.quantize is not None:
            return []
        assert self._loaded is not None
        warning = (
            f"quantization={setting!r} is set, but {rung.strategy.name} does not quantize: the weights stayed "
            f"{str(self._loaded.dtype).removeprefix('torch.')}"
        )
        logger.warning(warning)
        return [warning]

    def _prompt_warnings(self, request: GenerationRequest) -> list[str]:
        assert self._loaded is not None
        warnings = []
        tokens = count_prompt_tokens(self._loaded.pipe.tokenizer, request.prompt)
        if tokens > MAX_SEQUENCE_LENGTH:
            warnings.append(
                f"the prompt is {tokens} tokens with the chat template; the text encoder sees only the first "
                f"{MAX_SEQUENCE_LENGTH}, so the rest has no effect. Shorten it."
            )
        if request.negative_prompt is not None and request.guidance_scale == 0:
            warnings.append("negative_prompt has no effect when guidance_scale is 0")
        for warning in warnings:
            logger.warning(warning)
        return warnings

    def _out_of_rungs(self, request: GenerationRequest, fallbacks: list[Fallback]) -> ZImageError:
        """The error when no rung made the image: memory ran short, or a placement failed for another reason."""
        if not any(f.kind == "error" for f in fallbacks):
            return self._out_of_memory(request, fallbacks)
        tried = "\n  ".join(str(f) for f in fallbacks)
        return PlacementFailedError(
            f"No placement could make {request.width}x{request.height} x{request.num_images}. Tried:\n  {tried}\n"
            "A placement that fails for a reason other than memory is a bug: please report this message. "
            "strategy='cpu' or device='cuda:0' avoid the failed placements.",
            tried=fallbacks,
        )

    def _out_of_memory(self, request: GenerationRequest, fallbacks: list[Fallback]) -> NotEnoughMemoryError:
        assert self._loaded is not None
        work = Workload.of(request)
        would_fit = None
        for smaller in smaller_workloads(work, floor=256):
            best = self._plan(self._loaded.profile, smaller).best
            if best is not None:
                would_fit = f"{smaller.width}x{smaller.height} with {best.name}"
                break
        tried = "\n  ".join(str(f) for f in fallbacks) or "(nothing: no strategy was predicted to fit)"
        hint = (
            f"It would fit at {would_fit}; pass allow_downscale=True (ZIMAGE_ALLOW_DOWNSCALE=1) to lower the size "
            "automatically, or ask for a smaller image."
            if would_fit
            else "Free GPU memory (other programs), or use a machine with more memory."
        )
        return NotEnoughMemoryError(
            f"Not enough memory for {request.width}x{request.height} x{request.num_images}. Tried:\n  {tried}\n{hint}",
            tried=fallbacks,
            would_fit=would_fit,
        )


def _attempt(action: Callable[..., T], *args: Any) -> tuple[T | None, str | None]:
    """Run ``action(*args)``; on an out-of-memory error return (None, its first line) *after* the except block
    has ended, so that nothing of the failed attempt stays referenced by a traceback."""
    message = None
    try:
        return action(*args), None
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        message = first_line(exc)
    return None, message


def _failure_text(exc: BaseException) -> str:
    """An exception's type and first line, for fallbacks and logs."""
    return f"{type(exc).__name__}: {first_line(exc)}"


def _memory_was_short(fallbacks: list[Fallback]) -> bool:
    """Whether a smaller image could help: some rung ran out of memory, or none was even tried."""
    return any(f.kind == "strategy" for f in fallbacks) or not any(f.kind == "error" for f in fallbacks)


def _model_name(model: object) -> str:
    try:
        name = os.fspath(model)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidSettingsError(
            f"model must be a repo id or a folder (str or os.PathLike), got {type(model).__name__}"
        ) from None
    if not isinstance(name, str):
        raise InvalidSettingsError(f"model must be text, got {type(name).__name__}")
    return name


def _own(strategy: LoadStrategy | None) -> LoadStrategy | None:
    """A private copy of a strategy instance. A strategy remembers where it is applied, so one instance
    shared by two Generators would have one Generator's placement changed by the other."""
    if strategy is None:
        return None
    own = copy.copy(strategy)
    own.placed_off()
    return own


def _needs_less(rung: Candidate, failed: Candidate, phase: str) -> bool:
    """A rung worth trying after ``failed`` ran out of memory in ``phase``: it needs less in that phase
    (VAE tiling helps a decode, not a denoise); after a failure to place the weights, less overall."""

    def need(candidate: Candidate) -> int:
        return max(candidate.estimate.by_phase.get(phase, {}).values(), default=candidate.peak_bytes)

    if phase == "place":
        return rung.peak_bytes < failed.peak_bytes
    return need(rung) < need(failed)


def _doing(phase: str) -> str:
    return {"place": "placing weights", "encode": "encoding", "denoise": "denoising", "decode": "decoding"}.get(
        phase, phase
    )


def _parse_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidRequestError(f"device must be like 'cuda:1', 'cpu' or 'mps', got {device!r}") from None
    if checked.type not in ("cuda", "cpu", "mps"):
        raise InvalidRequestError(f"device must be a CUDA GPU, 'cpu' or 'mps', got {device!r}")
    return torch.device("cuda", checked.index or 0) if checked.type == "cuda" else checked


def _reset_peaks(devices: list[torch.device]) -> None:
    for device in devices:
        torch.cuda.reset_peak_memory_stats(device)


def _peaks(devices: list[torch.device]) -> dict[str, int]:
    peaks = {"host": host_peak_rss_bytes()}
    for device in devices:
        peaks[str(device)] = int(torch.cuda.max_memory_allocated(device))
    return peaks


def _progress(items: list[GenerationRequest], *, enabled: bool) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="prompts", unit="prompt")
