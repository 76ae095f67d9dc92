"""The loaded pipeline and the strategy applied to it: what sits where, and moving it on the same weights.

A :class:`Placement` exists from the load to ``close()``. It applies a strategy (removing the one before,
leaving in place what both keep on the same card), puts everything home after an interrupted move, applies an
offloading strategy again after an exception (fresh hooks, streamed weights home), pins the pipeline's
execution device once per placement, and remembers which strategies did not fit (``unplaceable``), failed on
their first use (``broken``) or have made an image (``proven``), and adds a ControlNet to the model when the
first request needs one. It knows nothing of requests or the ladder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .adapters import FusedWeights
from .controlnet import attach_controlnet, controlnet_of, load_controlnet
from .controlnet_sources import ControlNetSource
from .errors import first_line
from .execution import pin_execution_device
from .hardware import Hardware
from .loader import load_pipeline
from .loras import Lora
from .phases import release_memory, set_vae_tiling
from .planner import Candidate, candidate_for, effective_hardware
from .profile import ModelProfile, Workload
from .quantize import stored_bytes
from .result import Fallback
from .sources import ResolvedModel
from .strategies import LoadStrategy
from .strategies.base import CONTROLNET, component_names, components, host_homes, new_host_homes, send_everything_home

__all__ = ["Placement", "load_placement"]

logger = logging.getLogger(__name__)


# The most the allocator may hold beyond our weights that still counts as ours (see Placement.held_bytes): the
# largest seen on the H200 was 197 MiB (full_gpu, after loading).
UNTRACKED_MAX = 512 * 2**20


class Placement:
    """The pipeline loaded from ``model`` in ``dtype``, and what is applied to it.

    ``detect`` gives the hardware as it is now (free memory changes); ``seen`` the hardware as last detected,
    which is what the applied strategy was planned on.
    """

    def __init__(
        self,
        pipe: Any,
        *,
        model: ResolvedModel,
        profile: ModelProfile,
        dtype: torch.dtype,
        loaded_for: LoadStrategy | None,
        detect: Callable[[], Hardware],
        seen: Callable[[], Hardware | None],
        allocated_before: dict[int, int] | None = None,
    ) -> None:
        self.pipe = pipe
        self.model = model
        self.profile = profile
        self.dtype = dtype
        # the strategy whose load device the weights went to; None once they are back in their host homes
        self.loaded_for = loaded_for
        self.active: LoadStrategy | None = None
        self.unplaceable: set[LoadStrategy] = set()  # strategies whose weights did not fit when placed
        # strategies that failed on their first use for a reason other than memory, and those that have worked
        self.broken: set[LoadStrategy] = set()
        self.proven: set[LoadStrategy] = set()
        self.tile_from: int | None = None  # pixels from which the strategy in use needed a tiled decode
        # True when an exception interrupted a placement: the strategy in use may be half-applied
        self.unsettled = False
        self.placements = 0  # counts placements (the speed-ups re-check hooks after each)
        self._detect = detect
        self._seen = seen
        self._held: dict[int, int] | None = None  # held_bytes() of the placement in use
        # what the caching allocator had handed out on each GPU before this pipeline was loaded (not ours)
        self._allocated_before = dict(allocated_before or {})
        # (id of the pipeline, its execution device) under the placement in use; None: not asked yet
        self._execution_device: tuple[int, torch.device] | None = None
        # the LoRAs fused into the weights (they stay fused through every switch: they are in the weights)
        self.adapters = FusedWeights(pipe, host_homes(pipe), model.layout, dtype)
        self.controlnet: str | None = None  # the label of the ControlNet loaded (see add_controlnet)

    # -- what is where ----------------------------------------------------------------------------------

    def held_bytes(self) -> dict[int, int]:
        """Bytes our placement holds on each GPU, which the planner counts as free (we can move them): our
        weights, and what the allocator has handed out beyond them since we loaded (the kernels' workspaces and
        caches our calls left, 14-200 MiB on the H200). The plan a placement was sized by saw a card without
        either; without the second, the same placement could look 72 MiB too large at the next call and be
        swapped for a very different one of nearly the same predicted speed. The allocator's count cannot tell
        our allocations from another model's loaded on the same card since: at most :data:`UNTRACKED_MAX` beyond
        our weights counts as ours, so such a model costs a plan that much optimism, which the ladder absorbs.

        Counted once per placement (walking every tensor of the pipeline takes milliseconds, on every call)."""
        if self._held is not None:
            return self._held
        held: dict[int, int] = {}
        for module in components(self.pipe).values():
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.device.type == "cuda":
                    index = tensor.device.index or 0
                    held[index] = held.get(index, 0) + stored_bytes(tensor)
        for index, weights in held.items():
            since_loading = torch.cuda.memory_allocated(index) - self._allocated_before.get(index, 0)
            held[index] = weights + min(max(since_loading - weights, 0), UNTRACKED_MAX)
        if self.active is not None:
            self._held = held
        return held

    def hardware(self) -> Hardware:
        """The hardware now, with our own weights counted as free memory."""
        return effective_hardware(self._detect(), self.held_bytes())

    def execution_device(self) -> torch.device:
        """Where the placement computes, asked once per placement and pinned on the pipeline: diffusers would
        walk every module on each call, and names the wrong card when components sit on different ones."""
        assert self.active is not None
        if self._execution_device is None or self._execution_device[0] != id(self.pipe):
            pin_execution_device(self.pipe, None)
            self._execution_device = (id(self.pipe), self.active.execution_device(self.pipe))
            pin_execution_device(self.pipe, self._execution_device[1])
            self.placements += 1
        return self._execution_device[1]

    def device_name(self) -> str:
        """The execution device for a result: the pinned one, else what diffusers finds."""
        if self._execution_device is not None:
            return str(self._execution_device[1])
        return str(self.pipe._execution_device)

    # -- moving weights ---------------------------------------------------------------------------------

    def use(self, rung: Candidate) -> None:
        """Make ``rung`` the applied strategy (switching on the same weights) and set VAE tiling.

        Components that both the old and the new strategy keep resident on the same GPU stay there: a
        fallback from full_gpu to hybrid moves only the text encoder."""
        assert self._seen() is not None
        if self.active != rung.strategy:
            hardware = self.hardware()
            wanted = rung.strategy.resident(hardware)
            self.leave(wanted)
            if self.loaded_for is not None and rung.strategy != self.loaded_for:
                send_everything_home(self.pipe)  # weights were loaded straight to a GPU for another strategy
            self.loaded_for = None
            logger.info("placing the model: %s", rung.strategy.name)
            self._held = None
            self.active = rung.strategy
            self._forget_execution_device()
            self.tile_from = None
            rung.strategy.apply(self.pipe, hardware)
        set_vae_tiling(self.pipe, rung.vae_tiling)

    def leave(self, wanted: dict[str, torch.device] | None = None) -> None:
        """Remove the applied strategy, keeping in place the components ``wanted`` resident where they are."""
        if self.active is None:
            return
        keep: list[str] = []
        seen = self._seen()
        if wanted and seen is not None:
            held = self.active.resident(seen)
            present = component_names(self.pipe)  # no ControlNet until one is loaded
            keep = [name for name, device in held.items() if wanted.get(name) == device and name in present]
        self.active.remove(self.pipe, keep)
        self.active = None
        self._forget_execution_device()
        self._held = None
        self.loaded_for = None

    def add_controlnet(self, source: ControlNetSource) -> None:
        """Load the ControlNet of ``source`` (checked against the model already) and make it part of the model:
        the profile counts it and every strategy places it from the next placement on. It loads straight to the
        GPU where the strategy in use keeps it resident (into its host homes when that runs out of memory, or
        for any other strategy), as the other components were loaded. The strategy in use is removed, keeping in
        place what it keeps resident, so that the next :meth:`use` applies it again (or what the planner now
        prefers) with the ControlNet. Loaded once: it stays through every switch and fallback, as the other
        components do."""
        if controlnet_of(self.pipe) is not None:
            return
        module = self._load_controlnet(source)
        if self.active is not None:
            self.leave(self.active.resident(self.hardware()))
        attach_controlnet(self.pipe, module)
        self.profile = self.profile.with_controlnet(source.profile(self.dtype.itemsize))
        self.controlnet = source.label

    def _load_controlnet(self, source: ControlNetSource) -> Any:
        homes = host_homes(self.pipe)
        device = self.active.resident(self.hardware()).get(CONTROLNET) if self.active is not None else None
        if device is not None and device.type == "cuda":
            failure = ""
            try:
                return load_controlnet(source, dtype=self.dtype, homes=homes, destination=device)
            except torch.OutOfMemoryError as exc:
                failure = first_line(exc)
            release_memory()  # outside the except block, so that the half-loaded weights can really be freed
            logger.warning(
                "out of memory loading the ControlNet onto %s; loading it into host memory: %s", device, failure
            )
        return load_controlnet(source, dtype=self.dtype, homes=homes)

    def set_loras(self, loras: Sequence[Lora]) -> None:
        """Fuse ``loras`` (and no others) into the weights. A quantized placement holds copies made from the
        weights: it is removed first and applied again on the fused weights (fuse in bf16, then quantize)."""
        requantize = self.active if self.active is not None and self.active.quantize is not None else None
        if requantize is not None:
            self.leave(requantize.resident(self.hardware()))  # what it keeps resident unquantized stays put
        self.adapters.fuse(loras)
        if requantize is not None:
            self.use(candidate_for(requantize, self.profile, self.hardware(), Workload()))

    def settle(self) -> None:
        """An earlier call was stopped while weights moved and could not clean up: remove what it applied."""
        if self.unsettled:
            self.leave()
            self.unsettled = False

    def reset_after_failure(self, exc: BaseException) -> None:
        """An exception is leaving a call: leave the placement as a fresh ``apply()`` would, or nothing
        applied. diffusers resets no offload hooks after an exception, and a forward stopped half-way leaves
        streamed blocks on the device; the next call must not inherit either."""
        if self.active is None:
            self.unsettled = False
            return
        try:
            if self.unsettled or self.active in self.unplaceable | self.broken:
                self.leave()  # half-placed: every weight home; the next call applies afresh
            elif self.active.offloads:
                self._reapply()
            self.unsettled = False
        except Exception as problem:  # the original exception matters more; the next call cleans up
            self.unsettled = True
            logger.warning("could not reset %s after %s: %s", self.active, type(exc).__name__, problem)

    def _reapply(self) -> None:
        """Remove and apply the strategy in use again on the same weights: fresh hooks, streamed weights back
        in their homes; components it keeps resident stay where they are (nothing is copied)."""
        assert self.active is not None
        strategy = self.active
        hardware = self.hardware()
        strategy.remove(self.pipe, list(strategy.resident(hardware)))
        self._forget_execution_device()
        strategy.apply(self.pipe, hardware)

    def release(self, *, device_usable: bool) -> None:
        """Remove the strategy (unless the CUDA context is broken: then every CUDA call would fail, and the
        references are just dropped) and free the host homes."""
        if self.active is not None and device_usable:
            self.active.remove(self.pipe)
        host_homes(self.pipe).clear()
        self.active = None
        self._execution_device = None

    def _forget_execution_device(self) -> None:
        """The placement changed: the execution device is asked again (and pinned) before the next phase."""
        if self._execution_device is not None:
            pin_execution_device(self.pipe, None)
        self._execution_device = None


def load_placement(
    model: ResolvedModel,
    *,
    dtype: torch.dtype,
    profile: ModelProfile,
    first: LoadStrategy,
    hardware: Hardware,
    progress: bool,
    detect: Callable[[], Hardware],
    seen: Callable[[], Hardware | None],
) -> tuple[Placement, list[Fallback]]:
    """Load ``model`` with each component where ``first`` wants it (a GPU for what it keeps resident, the
    pinned host homes for what it offloads); if that runs out of GPU memory, everything into host memory
    instead, reported as a fallback."""
    targets = first.load_targets(hardware)
    allocated_before = allocated_now()
    where = ", ".join(f"{name} to {target}" for name, target in targets.items()) or "everything to host memory"
    logger.info("loading %s (%s) for %s, %s: %s", model.path, model.source, first.name, dtype, where)
    fallbacks: list[Fallback] = []
    failure = ""
    try:
        pipe = _load(model, dtype, targets, progress)
        loaded_for: LoadStrategy | None = first
    except torch.OutOfMemoryError as exc:
        if not targets:
            raise
        failure = first_line(exc)
    if failure:
        release_memory()  # outside the except block, so that the half-loaded weights can really be freed
        where = ", ".join(sorted({str(target) for target in targets.values()}))
        fallbacks.append(Fallback("load", where, "cpu", "load", f"out of memory loading onto {where}: {failure}"))
        logger.warning("out of memory loading onto %s; loading into host memory instead", where)
        pipe, loaded_for = _load(model, dtype, {}, progress), None  # None: the weights are in their host homes
    placement = Placement(
        pipe,
        model=model,
        profile=profile,
        dtype=dtype,
        loaded_for=loaded_for,
        detect=detect,
        seen=seen,
        allocated_before=allocated_before,
    )
    return placement, fallbacks


def allocated_now() -> dict[int, int]:
    """Bytes the caching allocator has handed out on each GPU this process has used (none before CUDA starts)."""
    if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # nothing allocated yet, and no start
        return {}
    return {index: torch.cuda.memory_allocated(index) for index in range(torch.cuda.device_count())}


def _load(model: ResolvedModel, dtype: torch.dtype, targets: dict[str, torch.device | str], progress: bool) -> Any:
    homes = new_host_homes()
    pipe = load_pipeline(model.layout, dtype=dtype, targets=targets, homes=homes, progress=progress)
    host_homes(pipe, homes)
    return pipe
