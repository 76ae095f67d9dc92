"""What a :class:`~zimage_turbo.generator.Generator` does under its public calls: loading, planning, and one
request through the out-of-memory ladder.

:class:`GeneratorCore` is the lowest of the Generator's classes: it declares the state that
:class:`~zimage_turbo.generator.Generator` sets up in its constructor, and holds the work that the public methods
(:mod:`~zimage_turbo.generator`, :mod:`~zimage_turbo.generator_adapters`) share: finding and loading the model
(its converted copy when there is one), planning a request over the hardware this Generator sees, running a
request rung by rung through the :class:`~zimage_turbo.ladder.Ladder`, and leaving the Generator usable (or
marked unusable, after a CUDA error that poisons the context) when an exception leaves a call.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import torch

from .call_guard import CallGuard
from .converted import find_copy, start_background_copy, worth_converting
from .ladder import Ladder
from .machine import Machine
from .package_map import package_map_file
from .phases import Progress
from .placement import Placement, load_placement
from .planner import Candidate, Plan
from .profile import ModelProfile, Workload
from .quiet_imports import quiet_imports
from .request import DEFAULT_STEPS, GenerationRequest
from .result import Fallback, GenerationResult
from .settings import ZImageSettings
from .sources import ResolvedModel, resolve_model
from .speedups import SpeedupDriver
from .strategies import LoadStrategy
from .tasks import Attempt, Call, result_of, run_task

__all__ = ["GENERATOR_LOGGER", "GeneratorCore"]

# The Generator's records keep the logger name they have always had, wherever the method that logs them lives:
# users set that logger's level.
GENERATOR_LOGGER = "zimage_turbo.generator"
logger = logging.getLogger(GENERATOR_LOGGER)


class GeneratorCore:
    """Loading, planning and running one request for a Generator (see the module's description)."""

    # Set by Generator.__init__ (see there for what each holds).
    settings: ZImageSettings
    _requested: LoadStrategy | None
    _requested_by_name: bool
    _machine: Machine
    _guard: CallGuard
    _placement: Placement | None
    _pending: list[Fallback]
    _conversion: threading.Thread | None
    _speedups: SpeedupDriver

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
        with self._guard.exclusive():
            self._guard.check_open()
            profile = self._placement.profile if self._placement else self._profile_without_loading()
            return self._plan(profile, request)

    def _profile_without_loading(self) -> ModelProfile:
        return self._read_model()[2]

    def _read_model(self) -> tuple[ResolvedModel, torch.dtype, ModelProfile]:
        """Resolve the model (its converted copy when there is a sound one) and read its sizes (headers only)
        at the dtype it will run in here."""
        model = resolve_model(self.settings)
        machine = self._machine
        device = machine.first_device(machine.detect())
        dtype = machine.dtype_for(device)
        if self.settings.converted_copy == "auto":
            model = find_copy(model, dtype, self.settings) or model
        machine.resolve_quantization(device)  # plan() shows the quantized rungs before loading too
        self._requested = machine.quantized_variant(self._requested, by_name=self._requested_by_name)
        return model, dtype, ModelProfile.from_layout(model.layout, dtype_bytes=dtype.itemsize)

    def _plan(self, profile: ModelProfile, request: GenerationRequest | Workload) -> Plan:
        held = self._placement.held_bytes() if self._placement is not None else {}
        return self._machine.plan(profile, request, held)

    # -- loading -----------------------------------------------------------------------------------------

    def _ensure_loaded(self) -> float:
        """Load if needed; return the seconds spent loading (0 when already loaded)."""
        self._guard.check_open()
        if self._placement is not None:
            return 0.0
        started = time.perf_counter()
        model, dtype, profile = self._read_model()
        machine = self._machine
        hardware = machine.hardware
        assert hardware is not None
        machine.check_attention(machine.first_device(hardware))
        first = machine.first_candidate(self._requested, profile, hardware)
        # the load's imports take the installed distributions' map kept by an earlier process (package_map.py)
        with quiet_imports(package_map=package_map_file(self.settings.cache_dir)):
            placement, fallbacks = load_placement(
                model,
                dtype=dtype,
                profile=profile,
                first=first.strategy,
                hardware=hardware,
                progress=self.settings.progress,
                detect=machine.detect,
                seen=machine.seen,
            )
        self._placement = placement
        self._pending += fallbacks
        # Place the weights now, so that a loaded Generator is ready; if that runs out of memory, the first
        # generation's ladder takes over.
        self._pending += self._ladder(placement).place_first(first)
        seconds = time.perf_counter() - started
        logger.info("loaded in %.1f s", seconds)
        if self.settings.converted_copy == "auto" and model.source != "converted" and worth_converting(model, dtype):
            self._conversion = start_background_copy(model, dtype, self.settings)  # for the next load
        return seconds

    # -- faults ------------------------------------------------------------------------------------------

    def _after_failure(self, exc: BaseException) -> None:
        """An exception is leaving a call: a CUDA error that poisons the context marks this Generator unusable;
        anything else leaves the placement as a fresh ``apply()`` would (see :meth:`Placement.reset_after_failure`)."""
        if self._guard.note(exc):
            logger.error("CUDA error; this Generator refuses further work: %s", self._guard.device_failure)
            return
        if self._placement is not None:
            self._placement.reset_after_failure(exc)

    # -- one request -------------------------------------------------------------------------------------

    def _generate(self, request: GenerationRequest, load_seconds: float, call: Call) -> GenerationResult:
        """One request through the ladder; on any exception, the Generator is left usable (or, after a CUDA
        error that poisons the context, marked unusable) before the exception propagates unchanged."""
        call.fallbacks, self._pending = self._pending, []
        try:
            started = time.perf_counter()
            assert self._placement is not None
            request, attempt = self._ladder(self._placement).climb(call, request)
            spent = attempt.timings.work + attempt.timings.prepare
            timings = replace(attempt.timings, load=load_seconds, recovery=time.perf_counter() - started - spent)
            return result_of(
                call, request, attempt, timings, self._placement, self._speedups, self.settings.quantization
            )
        except BaseException as exc:
            self._after_failure(exc)
            raise

    def _ladder(self, placement: Placement) -> Ladder:
        return Ladder(
            placement,
            requested=self._requested,
            plan_for=lambda work: self._plan(placement.profile, work),
            run=self._run_rung,
            allow_downscale=self.settings.allow_downscale,
        )

    def _run_rung(self, call: Call, request: GenerationRequest, rung: Candidate, progress: Progress) -> Attempt:
        assert self._placement is not None
        return run_task(call, request, rung, progress, self._placement, self._speedups, self._machine.gpu_devices())
