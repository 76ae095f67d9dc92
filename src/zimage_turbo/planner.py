"""Choose how to place the model: a pure function of sizes, hardware and the request (see :func:`plan`).

Every strategy is estimated for the workload (peak GPU memory per card, host memory) and, if it fits the free
memory minus a reserve, ranked by predicted time; with two or more GPUs, those that offload nothing to the host
(``full_gpu``, ``multi_gpu``) rank above every offloading one. Each that does not fit says why. VAE tiling is
offered as a variant of each strategy: it lowers the decode peak a lot at large sizes, for a little time, and
changes the image a little, so it ranks first only where it is clearly faster (:data:`TILING_MARGIN`).
Strategies with sizes of their own to decide (``partial``: how many blocks stay resident) are sized for the
workload and the card first (:meth:`~zimage_turbo.strategies.LoadStrategy.sized`). Times are predicted with the
speeds of the GPU that single-GPU placements use, when they were measured (:mod:`zimage_turbo.calibration`),
else with the calibration GPU's; the plan's footnote says which.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .activation_model import load_calibration
from .hardware import GIB, DeviceSpeeds, Hardware
from .model import VAE_TILE_PIXELS
from .profile import ModelProfile, Workload
from .request import DEFAULT_STEPS, SIDE_MULTIPLE, GenerationRequest
from .strategies import (
    CPUOnly,
    FullGPU,
    Hybrid,
    LoadStrategy,
    ModelCPUOffload,
    MultiGPUDispatch,
    MultiGPUHybrid,
    PartialOffload,
    SequentialOffload,
    StreamedOffload,
)
from .strategies.base import ALLOCATOR_MARGIN, MemoryEstimate
from .strategies.resident import CPU_TFLOP_PER_S

__all__ = ["Candidate", "Plan", "candidate_for", "plan", "planning_speeds", "smaller_workloads"]

# Host RAM to leave for the rest of the process and the system.
HOST_RESERVE_BYTES = 2 * GIB
# Downscaling: never below this many pixels on the shorter side (unless the request was smaller already).
DOWNSCALE_FLOOR = 512
# A tiled decode must be predicted faster by more than this share to rank above an untiled one: tiling changes
# the image a little (up to 22 levels of 255 at 1024x1024), and the time model cannot tell choices this close
# apart. On the H200 at 8 GiB (benchmarks/results/bench-partial-h200-2026-11-29.json) auto chose
# partial(16,0)+vae_tiling, predicted 2% faster than the untiled partial(13,0): it ran 1.79 s, the untiled one 1.70.
TILING_MARGIN = 0.05
# A placement that streams transformer blocks at every pass must be predicted faster by more than this share to
# rank above one that keeps the transformer resident. Its time rests on copies hiding behind compute, the least
# certain part of the model (and the first to suffer when something else uses the host link): at 16 GiB on the
# H200 partial(20,26) was predicted 1.42 s and ran 1.47, hybrid was predicted 1.46 and ran 1.43
# (benchmarks/results/gpu-tests-after-merges-h200-2026-11-29.log).
STREAMING_MARGIN = 0.05
# A partial placement that keeps every transformer block resident still holds pinned host copies of every weight
# (host RAM the size of the model) for nothing: at the same predicted speed the resident placement ranks first.
# (Their predictions are equal, so without this the order of the candidates decided.)
HOST_COPIES_MARGIN = 0.01


@dataclass(frozen=True)
class Candidate:
    """One way to run the workload: a strategy, with or without VAE tiling, and what it would cost."""

    strategy: LoadStrategy
    vae_tiling: bool
    estimate: MemoryEstimate
    seconds: float
    fits: bool
    reason: str = ""
    #: the share added to ``seconds`` when ranking (:attr:`ranking_seconds`)
    margin: float = 0.0

    @property
    def name(self) -> str:
        return self.strategy.label + ("+vae_tiling" if self.vae_tiling else "")

    @property
    def peak_bytes(self) -> int:
        return self.estimate.max_gpu_bytes

    @property
    def ranking_seconds(self) -> float:
        """The predicted seconds the plan ranks by: a tiled decode counts :data:`TILING_MARGIN` more and streaming
        transformer blocks at every pass :data:`STREAMING_MARGIN` more, so that either is chosen only where
        nothing else fits or where it is clearly faster; a partial placement streaming none of them counts
        :data:`HOST_COPIES_MARGIN` more (its pinned host copies serve nothing)."""
        return self.seconds * (1 + self.margin)


@dataclass(frozen=True)
class Plan:
    """Candidates for one workload: those that fit first (fastest first by
    :attr:`Candidate.ranking_seconds`; with several GPUs, those that offload
    nothing before those that do), then the rest (least memory first)."""

    workload: Workload
    hardware: Hardware
    steps: int
    candidates: tuple[Candidate, ...]
    reserve_bytes: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fitting(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if c.fits)

    @property
    def best(self) -> Candidate | None:
        """The fastest candidate that fits, if any."""
        return next(iter(self.fitting), None)

    def describe(self) -> str:
        """A table of every candidate, as ``zimage-turbo plan`` prints it."""
        work = self.workload
        lines = [
            f"Workload: {work.width}x{work.height}, {work.images} image(s), {self.steps} steps"
            + (", guidance on" if work.guidance else ""),
            "Hardware: " + self.hardware.describe().replace("\n", "; "),
            f"Reserve: {self.reserve_bytes / GIB:.1f} GiB per GPU, {ALLOCATOR_MARGIN:.0%} allocator margin",
            "",
            f"{'':2}{'strategy':30}{'GPU peak':>22}{'host RAM':>11}{'s/image*':>10}  verdict",
        ]
        for candidate in self.candidates:
            peaks = ", ".join(
                f"{'cuda:' + str(g) if g >= 0 else 'gpu'} {b / GIB:.1f}"
                for g, b in sorted(candidate.estimate.gpu_peak.items())
            )
            mark = "->" if candidate is self.best else "  "
            verdict = "fits" if candidate.fits else candidate.reason
            lines.append(
                f"{mark}{candidate.name:30}{peaks or '-':>22}{candidate.estimate.host_bytes / GIB:>10.1f}G"
                f"{candidate.seconds:>10.2f}  {verdict}"
            )
        lines.append("")
        lines.append(self.footnote)
        lines.extend(self.notes)
        return "\n".join(lines)

    @property
    def footnote(self) -> str:
        """What the predicted seconds assume: whose speeds the time model ran with."""
        hardware = self.hardware
        if not hardware.gpus:
            if hardware.mps:
                return "* predicted with the calibration GPU's speeds (an H200's): Apple GPUs are not measured."
            return f"* predicted for this CPU from a rough {CPU_TFLOP_PER_S:g} TFLOP/s: expect minutes per image."
        gpu = max(hardware.gpus, key=lambda g: g.free_bytes)
        if gpu.speeds is None:
            reference = load_calibration().speeds
            return (
                f"* predicted with the calibration GPU's speeds ({reference.name}: {reference.describe()}); "
                f"{gpu.device}'s were not measured."
            )
        return f"* predicted with the speeds of {gpu.device} ({gpu.speeds.name or gpu.name}: {gpu.speeds.describe()})."

    def __str__(self) -> str:
        return self.describe()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, as printed by ``zimage-turbo plan --json`` (sizes in bytes, times in seconds)."""
        work = self.workload
        return {
            "workload": {
                "width": work.width,
                "height": work.height,
                "images": work.images,
                "guidance": work.guidance,
                "steps": self.steps,
            },
            "hardware": self.hardware.to_dict(),
            "reserve_bytes": self.reserve_bytes,
            "candidates": [
                {
                    "name": c.name,
                    "strategy": c.strategy.label,
                    "vae_tiling": c.vae_tiling,
                    "fits": c.fits,
                    "reason": c.reason,
                    "seconds": c.seconds,
                    "gpu_peak_bytes": {_device_name(g): b for g, b in sorted(c.estimate.gpu_peak.items())},
                    "host_bytes": c.estimate.host_bytes,
                }
                for c in self.candidates
            ],
            "best": self.best.name if self.best is not None else None,
            "footnote": self.footnote,
            "notes": list(self.notes),
        }

    def _rows(self) -> list[tuple[str, str, str, str, str, str]]:
        """(best mark, strategy, GPU peak, host RAM, s/image, verdict) of each candidate, as text."""
        rows = []
        for c in self.candidates:
            peaks = ", ".join(f"{_device_name(g)} {b / GIB:.1f} GiB" for g, b in sorted(c.estimate.gpu_peak.items()))
            rows.append(
                (
                    "best" if c is self.best else "",
                    c.name,
                    peaks or "-",
                    f"{c.estimate.host_bytes / GIB:.1f} GiB",
                    f"{c.seconds:.2f}",
                    "fits" if c.fits else c.reason,
                )
            )
        return rows

    def _summary(self) -> list[str]:
        work = self.workload
        return [
            f"Workload: {work.width}x{work.height}, {work.images} image(s), {self.steps} steps"
            + (", guidance on" if work.guidance else ""),
            "Hardware: " + self.hardware.describe().replace("\n", "; "),
            f"Reserve: {self.reserve_bytes / GIB:.1f} GiB per GPU, {ALLOCATOR_MARGIN:.0%} allocator margin",
        ]

    def _repr_html_(self) -> str:
        """The table as HTML, for Jupyter."""
        cells = "".join(f"<th>{html.escape(name)}</th>" for name in _COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in self._rows()
        )
        paragraphs = "".join(f"<p>{html.escape(line)}</p>" for line in (*self._summary(), self.footnote, *self.notes))
        return f"<div>{paragraphs}<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table></div>"

    def _repr_markdown_(self) -> str:
        """The table as Markdown, for Jupyter."""
        lines = [_markdown_text(line) + "  " for line in self._summary()]
        lines += ["", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        lines += ["| " + " | ".join(_markdown_text(cell) for cell in row) + " |" for row in self._rows()]
        lines += ["", _markdown_text(self.footnote), *(_markdown_text(note) for note in self.notes)]
        return "\n".join(lines)


_COLUMNS = ("", "strategy", "GPU peak", "host RAM", "s/image*", "verdict")
# Characters that mean something in Markdown (a backslash before each makes it literal), and those that would
# start inline HTML or an entity (written as entities).
_MARKDOWN_SPECIAL = set("\\`*_{}[]()#+-.!|~")
_HTML_SPECIAL = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def _markdown_text(text: str) -> str:
    """``text`` as Markdown that shows exactly that text, also inside a table cell (no newlines there)."""
    return "".join(
        _HTML_SPECIAL.get(ch) or ("\\" + ch if ch in _MARKDOWN_SPECIAL else " " if ch in "\r\n" else ch) for ch in text
    )


def _device_name(gpu: int) -> str:
    """The estimate's key of a GPU as a device name: ``cuda:N``, or ``mps`` for -1 (the MPS device)."""
    return f"cuda:{gpu}" if gpu >= 0 else "mps"


def _strategies(hardware: Hardware, reserve_gib: float, work: Workload, quantize: str | None) -> list[LoadStrategy]:
    if hardware.gpus:
        strategies: list[LoadStrategy] = [FullGPU()]
        if len(hardware.gpus) > 1:
            strategies.append(MultiGPUDispatch(reserve_gib=reserve_gib, workload=work))
            strategies.append(MultiGPUHybrid(reserve_gib=reserve_gib, workload=work))
        strategies += [Hybrid(), PartialOffload(), ModelCPUOffload(), StreamedOffload(), SequentialOffload()]
        if quantize is not None:
            strategies += [
                FullGPU(quantize=quantize),
                Hybrid(quantize=quantize),
                PartialOffload(quantize=quantize),
                StreamedOffload(quantize=quantize),
            ]
        return strategies
    if hardware.mps:
        return [FullGPU(), CPUOnly()]
    return [CPUOnly()]


def candidate_for(
    strategy: LoadStrategy,
    profile: ModelProfile,
    hardware: Hardware,
    work: Workload,
    *,
    steps: int = DEFAULT_STEPS,
    reserve_bytes: int = 0,
) -> Candidate:
    """Estimate one strategy for one workload and say whether it fits. Sizes the strategy leaves open are decided
    first (:meth:`~zimage_turbo.strategies.LoadStrategy.sized`): the candidate holds the sized strategy. Times
    are for the speeds of the hardware's GPU (:func:`planning_speeds`) when known."""
    timed = profile.on(planning_speeds(hardware))
    strategy = strategy.sized(timed, hardware, work, reserve_bytes)
    estimate = strategy.estimate(timed, hardware, work)
    seconds = strategy.predict_seconds(timed, work, steps)
    reason = _why_not(estimate, hardware, reserve_bytes)
    margin = TILING_MARGIN if work.vae_tiling else 0.0
    if _streams(strategy, profile):
        margin += STREAMING_MARGIN
    elif isinstance(strategy, PartialOffload):
        margin += HOST_COPIES_MARGIN
    return Candidate(strategy, work.vae_tiling, estimate, seconds, fits=not reason, reason=reason, margin=margin)


def _streams(strategy: LoadStrategy, profile: ModelProfile) -> bool:
    """Whether ``strategy`` copies transformer blocks to the GPU at every pass."""
    if isinstance(strategy, PartialOffload):
        return (strategy.transformer_blocks or 0) < len(profile.transformer.block_bytes)
    return isinstance(strategy, (StreamedOffload, SequentialOffload))


def planning_speeds(hardware: Hardware) -> DeviceSpeeds | None:
    """The measured speeds of the GPU that single-GPU placements use (the one with the most free memory), if
    any."""
    if not hardware.gpus:
        return None
    return max(hardware.gpus, key=lambda g: g.free_bytes).speeds


def _why_not(estimate: MemoryEstimate, hardware: Hardware, reserve_bytes: int) -> str:
    if estimate.infeasible:
        return estimate.infeasible
    free = {g.index: g.free_bytes for g in hardware.gpus}
    for gpu, peak in estimate.gpu_peak.items():
        if gpu < 0:  # MPS shares host memory; nothing to check per card
            continue
        usable = free.get(gpu, 0) - reserve_bytes
        needed = int(peak * (1 + ALLOCATOR_MARGIN))
        if needed > usable:
            return f"needs {needed / GIB:.1f} GiB on cuda:{gpu}, {max(usable, 0) / GIB:.1f} GiB usable"
    host_usable = hardware.host_available_bytes - HOST_RESERVE_BYTES
    if hardware.host_available_bytes and estimate.host_bytes > host_usable:
        return f"needs {estimate.host_bytes / GIB:.1f} GiB of host RAM, {max(host_usable, 0) / GIB:.1f} GiB usable"
    return ""


def plan(
    profile: ModelProfile,
    hardware: Hardware,
    request: GenerationRequest | Workload | None = None,
    *,
    steps: int | None = None,
    reserve_gib: float = 0.5,
    strategies: Sequence[LoadStrategy] | None = None,
    quantize: str | None = None,
    prefer_lossless: bool = True,
) -> Plan:
    """Rank every way of running ``request`` on ``hardware``; pure (reads nothing, loads nothing).

    ``request`` may be a :class:`GenerationRequest`, a :class:`Workload`, or None (1024x1024, one image).
    ``hardware.gpus[i].free_bytes`` is what the plan may use on each card; ``reserve_gib`` is kept free on top.

    ``quantize`` (``"fp8"``, ``"int8"``) adds the quantized variants of ``full_gpu``, ``hybrid`` and ``streamed``. With
    ``prefer_lossless`` they rank below every lossless placement that keeps the transformer on the GPUs and above
    those that stream it (the small-card case); without, they rank first.

    Examples:
        On a hypothetical 16 GiB card (nothing is read from this machine):

        >>> from zimage_turbo import GPUInfo, Hardware, ModelProfile, plan
        >>> from zimage_turbo.hardware import GIB
        >>> gpu = GPUInfo(0, "RTX 4080", total_bytes=16 * GIB, free_bytes=15 * GIB, compute_capability=(8, 9))
        >>> ranking = plan(ModelProfile.z_image_turbo(), Hardware(gpus=(gpu,), host_available_bytes=48 * GIB))
        >>> ranking.best.name  # 23 transformer and 15 text-encoder blocks resident, the rest streamed
        'partial(23,15)'
        >>> [candidate.name for candidate in ranking.candidates if not candidate.fits]
        ['hybrid', 'full_gpu+vae_tiling', 'full_gpu']
        >>> print(ranking)  # the table `zimage-turbo plan` prints
        Workload: 1024x1024, 1 image(s), 8 steps
        ...
          strategy   GPU peak   host RAM  s/image*  verdict
        ->partial(23,15)   cuda:0 13.8   19.7G   ...  fits
        ...
    """
    work, steps = _workload(request, steps)
    reserve = int(reserve_gib * GIB)
    chosen = list(strategies) if strategies is not None else _strategies(hardware, reserve_gib, work, quantize)
    variants = [False, True] if max(work.height, work.width) > VAE_TILE_PIXELS else [False]
    candidates = []
    for tiling in variants:
        tiled = replace(work, vae_tiling=tiling)
        for strategy in chosen:
            if isinstance(strategy, MultiGPUDispatch):
                strategy = type(strategy)(reserve_gib=reserve_gib, workload=tiled)
            candidates.append(candidate_for(strategy, profile, hardware, tiled, steps=steps, reserve_bytes=reserve))
    # With several GPUs, placements that keep every weight on the GPUs come first whenever one fits, even where an
    # offloading one is predicted a little faster (large images): the offload predictions assume an idle
    # host link and host RAM for pinned weights, which cards in one machine share.
    resident_first = len(hardware.gpus) > 1
    tiered = any(c.strategy.quantize is not None for c in candidates)
    fitting = sorted(
        (c for c in candidates if c.fits),
        key=lambda c: (
            _quality_tier(c.strategy, prefer_lossless, profile) if tiered else 0,
            resident_first and c.strategy.offloads,
            c.ranking_seconds,
        ),
    )
    rest = sorted((c for c in candidates if not c.fits), key=lambda c: (c.peak_bytes, c.seconds))
    notes = () if fitting else ("Nothing fits at this size; a smaller image or more memory would.",)
    return Plan(work, hardware, steps, tuple(fitting + rest), reserve, notes)


def _quality_tier(strategy: LoadStrategy, prefer_lossless: bool, profile: ModelProfile) -> int:
    """0 ranks first. Quantized placements change the image, so by default they come only after every lossless
    one that keeps the transformer on the GPUs (where they would buy speed, not fit)."""
    if strategy.quantize is not None:
        return 1 if prefer_lossless else 0
    if not prefer_lossless:
        return 1
    if isinstance(strategy, PartialOffload):
        whole = (strategy.transformer_blocks or 0) >= len(profile.transformer.block_bytes)
        return 0 if whole else 2
    return 0 if isinstance(strategy, (FullGPU, MultiGPUDispatch, Hybrid)) else 2


def _workload(request: GenerationRequest | Workload | None, steps: int | None) -> tuple[Workload, int]:
    if request is None:
        return Workload(), steps or DEFAULT_STEPS
    if isinstance(request, Workload):
        return request, steps or DEFAULT_STEPS
    return Workload.of(request), steps or request.denoising_steps


def smaller_workloads(work: Workload, floor: int = DOWNSCALE_FLOOR) -> list[Workload]:
    """Ever smaller versions of ``work`` with the same aspect ratio, sides multiples of 16, the shorter side
    not below ``floor`` (or its current value, if smaller): each step has about 3/4 of the pixels."""
    shorter = min(work.height, work.width)
    limit = min(floor, shorter)
    sizes: list[tuple[int, int]] = []
    scale = 1.0
    while True:
        scale *= math.sqrt(0.75)
        height = max(SIDE_MULTIPLE, int(work.height * scale) // SIDE_MULTIPLE * SIDE_MULTIPLE)
        width = max(SIDE_MULTIPLE, int(work.width * scale) // SIDE_MULTIPLE * SIDE_MULTIPLE)
        if min(height, width) < limit:
            break
        if (height, width) != (work.height, work.width) and (not sizes or sizes[-1] != (height, width)):
            sizes.append((height, width))
    return [replace(work, height=h, width=w) for h, w in sizes]


def effective_hardware(hardware: Hardware, held: Mapping[int, int]) -> Hardware:
    """``hardware`` with the bytes our own pipeline holds on each card counted as free (we can move them)."""
    gpus = tuple(replace(g, free_bytes=g.free_bytes + held.get(g.index, 0)) for g in hardware.gpus)
    return replace(hardware, gpus=gpus)
