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

One Generator serializes its calls with a lock: diffusers' scheduler and tokenizer are not thread-safe. To use
several GPUs at once, give each its own Generator with ``device="cuda:N"`` (or use
:class:`~zimage_turbo.pool.GeneratorPool`, which does that).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from .errors import GeneratorClosedError, InvalidRequestError, NotEnoughMemoryError, NumericalError, first_line
from .hardware import GIB, Hardware, detect_hardware, host_peak_rss_bytes
from .loader import load_pipeline, resolve_dtype
from .phases import (
    MAX_SEQUENCE_LENGTH,
    Progress,
    clock,
    count_prompt_tokens,
    decode,
    denoise,
    encode,
    is_out_of_memory,
    release_memory,
    set_vae_tiling,
)
from .planner import Candidate, Plan, candidate_for, effective_hardware, plan, smaller_workloads
from .profile import ModelProfile, Workload
from .request import DEFAULT_STEPS, GenerationRequest, requests_for
from .result import Fallback, GenerationResult, Timings
from .settings import ZImageSettings
from .sources import ResolvedModel, resolve_model
from .strategies import LoadStrategy, strategy_from
from .strategies.base import components, host_homes, send_everything_home

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
        base = settings if settings is not None else ZImageSettings()
        if model is not None:
            base = base.replace(model=os.fspath(model))
        self.settings = base
        # Validate now, before any loading: None means "auto".
        self._requested: LoadStrategy | None = strategy_from(strategy if strategy is not None else base.strategy)
        self._device = _check_device(device)
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self._active: LoadStrategy | None = None
        self._hardware: Hardware | None = None
        self._pending: list[Fallback] = []  # what loading had to change, reported with the next result
        self._unplaceable: set[LoadStrategy] = set()  # strategies whose weights did not fit when placed
        self._tile_from: int | None = None  # pixels from which the strategy in use needed a tiled decode
        self._closed = False
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
        with self._lock, self._on_device():
            self._ensure_loaded()
        return self

    def close(self) -> None:
        """Release the model and its memory. The Generator cannot be used afterwards."""
        with self._lock:
            if self._loaded is not None:
                if self._active is not None:
                    self._active.remove(self._loaded.pipe)
                host_homes(self._loaded.pipe).clear()
            self._loaded = None
            self._active = None
            self._closed = True
        release_memory()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def switch(self, strategy: str | LoadStrategy) -> None:
        """Use ``strategy`` from now on (``"auto"`` lets the planner choose again). When the model is loaded,
        the weights move at once: the current strategy is removed and the new one applied on the same
        modules, without reading anything from disk."""
        chosen = strategy_from(strategy)
        with self._lock, self._on_device():
            self._requested = chosen
            self._unplaceable.discard(chosen)
            if self._loaded is None or chosen is None:
                return
            hardware = effective_hardware(self._detect(), self._held_bytes())
            candidate = candidate_for(chosen, self._loaded.profile, hardware, Workload())
            self._use(candidate)

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
        with self._lock:
            profile = self._loaded.profile if self._loaded else self._profile_without_loading()
            return self._plan(profile, request)

    def _profile_without_loading(self) -> ModelProfile:
        return self._read_model()[2]

    def _read_model(self) -> tuple[ResolvedModel, torch.dtype, ModelProfile]:
        """Resolve the model and read its sizes (headers only) at the dtype it will run in here."""
        model = resolve_model(self.settings)
        dtype = self._dtype_for(self._first_device(self._detect()))
        return model, dtype, ModelProfile.from_layout(model.layout, dtype_bytes=dtype.itemsize)

    def _plan(self, profile: ModelProfile, request: GenerationRequest | Workload) -> Plan:
        hardware = effective_hardware(self._detect(), self._held_bytes())
        return plan(profile, hardware, request, reserve_gib=self.settings.vram_reserve_gib)

    def _detect(self) -> Hardware:
        budget = self.settings.vram_budget_gib
        hardware = detect_hardware(vram_budget_bytes=None if budget is None else int(budget * GIB))
        self._hardware = hardware if self._device is None else hardware.restricted_to(self._device)
        return self._hardware

    def _held_bytes(self) -> dict[int, int]:
        """Bytes of our own weights on each GPU (the planner may count them as free: we can move them)."""
        held: dict[int, int] = {}
        if self._loaded is None:
            return held
        for module in components(self._loaded.pipe).values():
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.device.type == "cuda":
                    index = tensor.device.index or 0
                    held[index] = held.get(index, 0) + tensor.numel() * tensor.element_size()
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
        if self._closed:
            raise GeneratorClosedError("this Generator was closed; create a new one")
        if self._loaded is not None:
            return 0.0
        started = time.perf_counter()
        model, dtype, profile = self._read_model()
        hardware = self._hardware
        assert hardware is not None
        first = self._first_candidate(profile, hardware)
        device = first.strategy.load_device(hardware)
        logger.info("loading %s (%s) onto %s for %s, %s", model.path, model.source, device, first.name, dtype)
        pipe, placed = self._load_to(model, dtype, device)
        loaded_for = first.strategy if placed == device else None  # None: they landed in host memory instead
        self._loaded = _Loaded(pipe=pipe, model=model, profile=profile, dtype=dtype, loaded_for=loaded_for)
        # Place the weights now, so that a loaded Generator is ready; if that runs out of memory, the first
        # generation's ladder takes over.
        _, failure = _attempt(self._use, first)
        if failure is not None:
            release_memory()
            self._pending.append(Fallback("strategy", first.name, "", "place", failure))
            self._unplaceable.add(first.strategy)
            self._leave_active()
            release_memory()
        seconds = time.perf_counter() - started
        logger.info("loaded in %.1f s", seconds)
        return seconds

    def _first_candidate(self, profile: ModelProfile, hardware: Hardware) -> Candidate:
        """The requested strategy, or what 'auto' picks for a 1024x1024 image: the best fit, else the
        candidate needing the least memory."""
        if self._requested is not None:
            return candidate_for(self._requested, profile, hardware, Workload())
        ranked = plan(profile, hardware, Workload(), reserve_gib=self.settings.vram_reserve_gib)
        return ranked.best or ranked.candidates[0]

    def _load_to(self, model: ResolvedModel, dtype: torch.dtype, device: torch.device) -> tuple[Any, torch.device]:
        failure = ""
        try:
            return load_pipeline(model.layout, dtype=dtype, device=device, progress=self.settings.progress), device
        except torch.OutOfMemoryError as exc:
            if device.type == "cpu":
                raise
            failure = first_line(exc)
        release_memory()  # outside the except block, so that the half-loaded weights can really be freed
        self._pending.append(
            Fallback("load", str(device), "cpu", "load", f"out of memory loading onto {device}: {failure}")
        )
        logger.warning("out of memory loading onto %s; loading into host memory instead", device)
        cpu = torch.device("cpu")
        return load_pipeline(model.layout, dtype=dtype, device=cpu, progress=self.settings.progress), cpu

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

        Raises:
            NotEnoughMemoryError: every way of running it ran out of memory (the Generator stays usable).
        """
        [result] = self.generate_many(
            [prompt],
            height=height,
            width=width,
            steps=steps,
            seed=seed,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            num_images=num_images,
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
    ) -> list[GenerationResult]:
        """Generate for several prompts in turn, reusing the loaded model; results keep the prompts' order.

        ``seed`` may be one int (prompt ``i`` uses ``seed + i``), one seed per prompt, or None (random
        seeds). The other arguments are those of :meth:`generate` and apply to every prompt. Every prompt
        is validated before the first image is generated.
        """
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
        results = []
        with self._lock, self._on_device():
            load_seconds = self._ensure_loaded()
            for request in _progress(requests, enabled=self.settings.progress and len(requests) > 1):
                results.append(self._generate(request, load_seconds))
                load_seconds = 0.0
        return results

    def _generate(self, request: GenerationRequest, load_seconds: float) -> GenerationResult:
        """One request through the ladder, and then, if allowed, at smaller sizes."""
        fallbacks: list[Fallback] = self._pending
        self._pending = []
        started = time.perf_counter()
        attempt = self._climb(request, fallbacks)
        if attempt is None and self.settings.allow_downscale:
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
            raise self._out_of_memory(request, fallbacks)
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
            outcome, failure = _attempt(self._run, request, rung, progress, fallbacks)
            if failure is None:
                assert outcome is not None
                return outcome
            release_memory()  # we are out of the except block: the failed frames are gone
            fallbacks.append(Fallback("strategy", rung.name, "", progress.phase, failure))
            if progress.phase == "place":
                self._unplaceable.add(rung.strategy)
            logger.warning("%s ran out of memory while %s: %s", rung.name, _doing(progress.phase), failure)
            failed, failed_phase = rung, progress.phase  # the next rung's _use() moves the weights
        return None

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
        return [rung for rung in rungs if rung.strategy not in self._unplaceable]

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
            self._active = rung.strategy
            self._tile_from = None
            rung.strategy.apply(pipe, hardware)
        set_vae_tiling(pipe, rung.vae_tiling)

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
        self._loaded.loaded_for = None

    def _run(
        self, request: GenerationRequest, rung: Candidate, progress: Progress, fallbacks: list[Fallback]
    ) -> tuple[list[Any], Timings, Candidate, dict[str, int]]:
        """Place the model for ``rung`` and run the phases not yet done; on a decode that runs out of memory
        without tiling, retry the decode with tiling from the same latents."""
        progress.phase = "place"
        self._use(rung)  # outside inference mode: weights must stay ordinary tensors
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
        start = clock(devices)
        if progress.embeds is None:
            progress.phase = "encode"
            embeds = encode(pipe, request.prompt, request.negative_prompt, guidance, self._active_encode_device())
            progress.embeds = ([t.cpu() for t in embeds[0]], [t.cpu() for t in embeds[1]])
        encoded = clock(devices)
        if progress.latents is None:
            progress.phase = "denoise"
            latents = denoise(
                pipe,
                progress.embeds,
                height=request.height,
                width=request.width,
                steps=request.steps,
                guidance_scale=request.guidance_scale,
                seeds=request.seeds,
            )
            if not bool(torch.isfinite(latents).all()):
                raise NumericalError(
                    f"the denoised latents contain NaN or infinity ({self._loaded.dtype}); the image would be "
                    "black. float16 does this on GPUs without bf16: use dtype='float32' or 'bfloat16'."
                )
            progress.latents = latents.cpu()
        denoised = clock(devices)
        progress.phase = "decode"
        latents = progress.latents
        assert latents is not None
        images, failure = _attempt(decode, pipe, latents)
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
            images = decode(pipe, latents)
        decoded = clock(devices)
        assert images is not None
        timings = Timings(encode=encoded - start, denoise=denoised - encoded, decode=decoded - denoised)
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

    def _active_encode_device(self) -> torch.device:
        assert self._active is not None and self._loaded is not None
        return self._active.encode_device(self._loaded.pipe)

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
            device=str(self._loaded.pipe._execution_device),
            dtype=str(self._loaded.dtype).removeprefix("torch."),
            timings=timings,
            peak_memory=peaks,
            predicted_peak_memory=predicted,
            vae_tiling=rung.vae_tiling,
            fallbacks=tuple(fallbacks),
            warnings=tuple(warnings),
        )

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


def _check_device(device: str | torch.device | None) -> torch.device | None:
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
