"""The interface every way of placing the model implements, and what they share.

A strategy decides where each component's weights live and where they run:

* ``estimate(profile, hardware, work)`` is pure: from sizes alone it predicts the peak memory per GPU and the
  host memory the strategy needs, phase by phase (encode, denoise, decode);
* ``predict_seconds(profile, work, steps)`` is pure too: seconds per image on the calibration GPU;
* ``apply(pipe, hardware)`` places the weights (and installs any hooks);
* ``remove(pipe)`` undoes it: hooks gone, every weight back in host memory.

A strategy never reads weights from disk. The Generator loads the pipeline once (straight to
:meth:`LoadStrategy.load_targets`) and switching strategy is ``remove()`` then ``apply()`` on the same modules,
so a fallback after running out of memory costs seconds, not a 20 GB reload. Between strategies every
weight lives in its host home (see :mod:`zimage_turbo.host`).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..controlnet import controlnet_of
from ..errors import InvalidSettingsError, StrategyUnavailableError
from ..hardware import Hardware
from ..host import CHUNK_BYTES, HostHomes, module_tensors
from ..profile import ModelProfile, Workload
from ..quantize import QUANTIZATIONS, quantize_linears, quantized_linears, restore_linears

__all__ = [
    "PHASES",
    "LoadStrategy",
    "MemoryEstimate",
    "Quantizable",
    "QuantizableTransformer",
    "component_names",
    "components",
    "host_homes",
    "new_host_homes",
    "on_one_gpu",
    "peaks_over_phases",
    "place_resident",
    "quantized_block_bytes",
    "quantized_transformer_bytes",
]

PHASES = ("encode", "encode_image", "denoise", "decode")
# Phases whose weights on the GPU are those of another phase when a strategy gives none of their own: only the VAE
# runs while input images are encoded, as while latents are decoded.
_WEIGHTS_AS = {"encode_image": "decode"}
# The caching allocator needs some slack beyond the bytes it hands out (fragmentation): a plan fits a card
# only with this margin on top of the estimated peak.
ALLOCATOR_MARGIN = 0.04
COMPONENTS = ("text_encoder", "transformer", "vae")
# a ControlNet, once loaded (see zimage_turbo.controlnet): placed by every strategy beside the others
CONTROLNET = "controlnet"
_HOMES_ATTRIBUTE = "_zimage_turbo_homes"
# Share of a transformer block's bytes in the linear layers that quantization replaces (attention and
# feed-forward: 177 of 181 M parameters per block in Z-Image).
QUANTIZED_SHARE = 0.97
# Eager denoising time of a quantized transformer relative to bf16 (predictions are eager; compiling scales
# both, see speedups/compile.py). fp8, measured on the H200 at 1024x1024: 1.364 s against 1.185 s, since torchao
# quantizes each activation in kernels of its own (compiled, 0.569 s against 0.793 s). int8 weight-only
# dequantizes in every matmul: an estimate, not measured.
QUANTIZED_DENOISE = {"fp8": 1.15, "int8": 1.1}


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted memory of one strategy for one workload.

    ``gpu_peak`` maps a GPU index to its peak bytes (weights resident plus activations, at the worst phase);
    ``host_bytes`` is the host RAM the weights take while the strategy is applied (pinned bytes included,
    with their rounding); ``by_phase`` gives the per-phase peaks behind ``gpu_peak`` for explanations.
    """

    gpu_peak: Mapping[int, int]
    host_bytes: int = 0
    pinned_bytes: int = 0
    by_phase: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    infeasible: str = ""  # set when the strategy cannot place the model at all here, saying why

    @property
    def max_gpu_bytes(self) -> int:
        return max(self.gpu_peak.values(), default=0)


def peaks_over_phases(
    resident: Mapping[str, Mapping[int, int]], activations: Mapping[str, Mapping[int, int]]
) -> MemoryEstimate:
    """Peak per GPU = max over phases of (weights resident in that phase + that phase's activations)."""
    by_phase: dict[str, dict[int, int]] = {}
    peaks: dict[int, int] = {}
    for phase in PHASES:
        weights = resident.get(phase, resident.get(_WEIGHTS_AS.get(phase, phase), {}))
        devices = set(weights) | set(activations.get(phase, {}))
        by_phase[phase] = {gpu: weights.get(gpu, 0) + activations.get(phase, {}).get(gpu, 0) for gpu in devices}
        for gpu, value in by_phase[phase].items():
            peaks[gpu] = max(peaks.get(gpu, 0), value)
    return MemoryEstimate(gpu_peak=peaks, by_phase=by_phase)


def on_one_gpu(
    gpu: int, resident: Mapping[str, int], activations: Mapping[str, int], *, pinned: int = 0
) -> MemoryEstimate:
    """The estimate of a placement that computes on one GPU: per phase, the weights ``resident`` on it then
    plus that phase's ``activations``; ``pinned`` host bytes (also counted as host memory)."""
    peaks = peaks_over_phases(
        {phase: {gpu: nbytes} for phase, nbytes in resident.items()},
        {phase: {gpu: nbytes} for phase, nbytes in activations.items()},
    )
    return MemoryEstimate(peaks.gpu_peak, pinned, pinned, peaks.by_phase)


def pinned_size(nbytes: int, largest_tensor: int = 0, chunk: int = CHUNK_BYTES) -> int:
    """Host bytes that ``nbytes`` of weights take in our pinned buffers (see :mod:`zimage_turbo.host`).

    Buffers are 1 GiB, filled in order; each loses on average half a tensor at its end (tensors are mostly far
    smaller than the largest one), and the last one is the power of two above what it holds.
    """
    if nbytes <= 0:
        return 0
    usable = chunk - min(largest_tensor, 128 * 2**20) // 2
    full, rest = divmod(nbytes, usable)
    return full * chunk + (0 if rest == 0 else min(chunk, 1 << (rest - 1).bit_length()))


def component_names(pipe: Any) -> tuple[str, ...]:
    """The names of the pipeline's weighted components: its own three, and ``"controlnet"`` once one is loaded."""
    return (*COMPONENTS, CONTROLNET) if controlnet_of(pipe) is not None else COMPONENTS


def components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's weighted components by name (the ControlNet among them once loaded)."""
    return {name: getattr(pipe, name) for name in component_names(pipe)}


def new_host_homes() -> HostHomes:
    """Host homes for a pipeline's weights: pinned when CUDA is available (for fast, asynchronous copies)."""
    return HostHomes(pin=torch.cuda.is_available())


def host_homes(pipe: Any, homes: HostHomes | None = None) -> HostHomes:
    """The pipeline's host homes: ``homes`` when given (the loader filled them), else those it has, else new."""
    if homes is not None:
        setattr(pipe, _HOMES_ATTRIBUTE, homes)
        return homes
    existing = getattr(pipe, _HOMES_ATTRIBUTE, None)
    if existing is None:
        existing = new_host_homes()
        setattr(pipe, _HOMES_ATTRIBUTE, existing)
    return existing


def quantized_transformer_bytes(profile: ModelProfile, kind: str | None) -> int:
    """The transformer's bytes on the GPU with its large linear layers quantized to one byte per weight."""
    blocks = sum(profile.transformer.block_bytes)
    return profile.transformer.weight_bytes - blocks + quantized_block_bytes(profile, kind, blocks)


def quantized_block_bytes(profile: ModelProfile, kind: str | None, block_bytes: int) -> int:
    """Bytes of transformer blocks of ``block_bytes`` once their linear layers hold one byte per weight."""
    if kind is None:
        return block_bytes
    return block_bytes - int(block_bytes * QUANTIZED_SHARE * (1 - 1 / profile.dtype_bytes))


def check_quantize(quantize: str | None) -> str | None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise InvalidSettingsError(f"quantize must be None or one of {', '.join(QUANTIZATIONS)}; got {quantize!r}")
    return quantize


def place_resident(
    pipe: Any, names: Collection[str], device: torch.device, quantize: str | None = None
) -> dict[str, torch.nn.Parameter]:
    """Copy the named components to ``device``.

    Host homes they already have stay (pinned buffers are reused across strategy switches: a fallback or a
    switch back to an offloading strategy is then a pointer swap, not a fresh pinning, which costs about
    1.6 GB/s on first touch); weights loaded straight to the GPU have none and get none here.

    With ``quantize``, the transformer's large linear layers get quantized copies on the device instead (built
    one layer at a time, so the bf16 transformer never has to fit there), and their original weights stay in
    their host homes: returned, for :func:`~zimage_turbo.quantize.restore_linears` to put back."""
    homes = host_homes(pipe)
    quantized = quantize is not None and "transformer" in names
    kept = {id(linear.weight) for linear in quantized_linears(pipe.transformer).values()} if quantized else set()
    moved = {name: [t for t in module_tensors(getattr(pipe, name)) if id(t) not in kept] for name in names}
    for tensors in moved.values():
        homes.send_to(tensors, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return quantize_linears(pipe.transformer, quantize, device) if quantized else {}  # type: ignore[arg-type]


class LoadStrategy(ABC):
    """How the pipeline's components are placed on devices.

    Subclasses set ``name`` (what users pass as ``strategy=``) and implement the abstract methods.

    Args:
        device: the GPU to run on (``"cuda:1"``); None picks the GPU with the most free memory. Passing
            ``"cpu"`` runs the same placement logic on the CPU, which is useful only for testing.
    """

    name: ClassVar[str]
    #: strategies that keep weights on the host and move them per call (slower, less GPU memory)
    offloads: ClassVar[bool] = True
    #: the transformer stays on one device with no hooks on its blocks, so the blocks can be compiled
    compilable: ClassVar[bool] = False
    #: it places a ControlNet beside the transformer, so that requests with a control image run under it
    places_controlnet: ClassVar[bool] = True

    def __init__(self, device: str | torch.device | None = None) -> None:
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidSettingsError(
                f"{type(self).__name__}: device must be like 'cuda:1', 'cpu' or 'mps', got {device!r}"
            ) from None
        self._placed_on: torch.device | None = None

    # -- pure ---------------------------------------------------------------------------------------------

    @abstractmethod
    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        """Peak memory per GPU and host memory for ``work``, from sizes alone."""

    @abstractmethod
    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        """Seconds per generation on the GPU whose speeds ``profile``'s time model has (see
        :meth:`~zimage_turbo.profile.ModelProfile.on`; the calibration GPU's, an H200's, by default)."""

    def sized(self, profile: ModelProfile, hardware: Hardware, work: Workload, reserve_bytes: int = 0) -> LoadStrategy:
        """This strategy with every size it leaves open decided for ``work`` on ``hardware``, ``reserve_bytes``
        kept free on the card (``partial``: how many blocks stay resident). The planner and the ladder estimate
        and apply the result, so that what is estimated is what is placed. Itself when nothing is open."""
        return self

    def smaller(self, phase: str) -> LoadStrategy | None:
        """A variant of this strategy that needs less GPU memory in ``phase`` (``"place"``, ``"encode"``,
        ``"denoise"``, ``"decode"``), which the ladder tries first when this one runs out of memory there, on
        the same weights; None when there is none (the ladder moves on to the next strategy)."""
        return None

    def target(self, hardware: Hardware) -> torch.device:
        """The device this strategy runs on (once applied, the device it was applied to)."""
        if self._placed_on is not None:
            return self._placed_on
        if self.device is not None:
            if self.device.type == "cuda" and not any(g.index == (self.device.index or 0) for g in hardware.gpus):
                visible = ", ".join(g.device for g in hardware.gpus) or "none"
                raise StrategyUnavailableError(f"{self.name}: there is no {self.device}; visible GPUs: {visible}")
            return self.device
        if hardware.gpus:
            best = max(hardware.gpus, key=lambda g: g.free_bytes)
            return torch.device("cuda", best.index)
        if hardware.mps:
            return torch.device("mps")
        raise StrategyUnavailableError(f"{self.name} needs a CUDA or MPS GPU, and none was found; use strategy='cpu'")

    def gpu_index(self, hardware: Hardware) -> int:
        """The key this strategy's single device has in ``MemoryEstimate.gpu_peak`` (-1 for CPU or MPS)."""
        device = self.target(hardware)
        return (device.index or 0) if device.type == "cuda" else -1

    def load_targets(self, hardware: Hardware) -> dict[str, torch.device | str]:
        """Where each component's weights should go when the pipeline is first loaded: the device of every
        component this strategy keeps resident; the others (absent here) go to their host homes, pinned
        where offloading will stream them from. (A ControlNet is loaded later, into its host homes.)"""
        return {name: device for name, device in self.resident(hardware).items() if name in COMPONENTS}

    def encode_device(self, pipe: Any, execution_device: torch.device) -> torch.device:
        """Where prompt token ids go: the device the text encoder computes on (for most strategies the
        pipeline's ``execution_device``)."""
        return execution_device

    def execution_device(self, pipe: Any) -> torch.device:
        """Where the transformer and the VAE compute once applied: latents, timesteps and the decode's input
        go there. By default diffusers' own answer, which the Generator asks once per placement and then pins
        (see :mod:`zimage_turbo.execution`); strategies that spread components over cards say it themselves."""
        return torch.device(pipe._execution_device)

    # -- side effects -------------------------------------------------------------------------------------

    @abstractmethod
    def apply(self, pipe: Any, hardware: Hardware) -> None:
        """Place (or hook) the pipeline's modules for this strategy. Weights start in their host homes."""

    def place_on(self, hardware: Hardware) -> torch.device:
        """The target device, remembered for as long as the strategy stays applied (free memory changes once
        the weights are there, and must not change where we think they are)."""
        self._placed_on = None
        self._placed_on = self.target(hardware)
        return self._placed_on

    def placed_off(self) -> None:
        self._placed_on = None

    @abstractmethod
    def remove(self, pipe: Any, keep: Collection[str] = ()) -> None:
        """Undo :meth:`apply`: remove hooks, send every weight back to its host home.

        Components named in ``keep`` that this strategy holds resident stay where they are: the Generator
        passes those that the next strategy wants resident on the same device, so that a switch moves only
        what has to move.
        """

    def resident(self, hardware: Hardware) -> dict[str, torch.device]:
        """Components this strategy keeps wholly on one device while applied (none by default)."""
        return {}

    @property
    def quantize(self) -> str | None:
        """The quantization of the transformer's linear layers under this strategy (None: the loaded dtype)."""
        return None

    @property
    def label(self) -> str:
        """The name, with the quantization when there is one (``"hybrid+fp8"``)."""
        return self.name + (f"+{self.quantize}" if self.quantize else "")

    def describe(self) -> str:
        return self.label

    def __repr__(self) -> str:
        device = "" if self.device is None else f"device={str(self.device)!r}"
        return f"{type(self).__name__}({device})"

    def identity(self) -> tuple[Any, ...]:
        """What makes two instances place the model the same way (public settings, not runtime state)."""
        return tuple(sorted((k, str(v)) for k, v in vars(self).items() if not k.startswith("_")))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, LoadStrategy) and other.identity() == self.identity()

    def __hash__(self) -> int:
        return hash((type(self), self.identity()))


def send_everything_home(pipe: Any, keep: Collection[str] = ()) -> None:
    """Every weight of the pipeline (but the components in ``keep``) back in host memory: to its home, or
    adopted (copied) if it has none."""
    homes = host_homes(pipe)
    for name, module in components(pipe).items():
        if name not in keep:
            homes.send_home(module)


class Quantizable(LoadStrategy):
    """A strategy whose transformer's large linear layers can be quantized (``quantize="fp8"`` or ``"int8"``).

    Subclasses call :meth:`_set_quantize` in ``__init__``.
    """

    _quantize: str | None = None

    def _set_quantize(self, quantize: str | None) -> None:
        self._quantize = check_quantize(quantize)

    @property
    def quantize(self) -> str | None:
        return self._quantize

    def identity(self) -> tuple[Any, ...]:
        return (*super().identity(), ("quantize", str(self._quantize)))

    def _compute_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> dict[str, float]:
        compute = profile.compute_seconds(work, steps)
        if self._quantize is not None:
            compute["denoise"] *= QUANTIZED_DENOISE[self._quantize]
        return compute


class QuantizableTransformer(Quantizable):
    """What the strategies that keep the transformer on one GPU (``full_gpu``, ``hybrid``) share: their blocks can
    be compiled, and their transformer can be quantized in place on the GPU.

    Subclasses call :meth:`_set_quantize` in ``__init__``, place their resident components with
    :meth:`_place` and start ``remove()`` with :meth:`_restore`.
    """

    compilable: ClassVar[bool] = True
    _originals: dict[str, torch.nn.Parameter]  # bf16 weights of the quantized layers, at their host homes

    def _set_quantize(self, quantize: str | None) -> None:
        super()._set_quantize(quantize)
        self._originals = {}

    def load_targets(self, hardware: Hardware) -> dict[str, torch.device | str]:
        targets = super().load_targets(hardware)
        if self._quantize is not None:
            targets.pop("transformer", None)  # quantized layer by layer from its bf16 weights in host memory
        return targets

    def _place(self, pipe: Any, names: Collection[str], device: torch.device) -> None:
        self._originals = place_resident(pipe, names, device, self._quantize)

    def _restore(self, pipe: Any, keep: Collection[str]) -> list[str]:
        """Put the bf16 weights back (the quantized copies are dropped); returns ``keep`` without the
        transformer when it was quantized, since its device copy is gone."""
        if not self._originals:
            return list(keep)
        restore_linears(pipe.transformer, self._originals)
        self._originals = {}
        return [name for name in keep if name != "transformer"]

    def _transformer_bytes(self, profile: ModelProfile) -> int:
        """The transformer's bytes on the GPU."""
        return quantized_transformer_bytes(profile, self._quantize)

    def _quantized_host_bytes(self, profile: ModelProfile) -> int:
        """Pinned host memory the bf16 originals of quantized layers keep (0 without quantization)."""
        if self._quantize is None:
            return 0
        transformer = profile.transformer
        return pinned_size(sum(transformer.block_bytes), transformer.largest_block_tensor_bytes)


def private_copy(strategy: LoadStrategy | None) -> LoadStrategy | None:
    """A private copy of a strategy instance. A strategy remembers where it is applied, so one instance
    shared by two Generators would have one Generator's placement changed by the other."""
    if strategy is None:
        return None
    own = copy.copy(strategy)
    own.placed_off()
    return own
