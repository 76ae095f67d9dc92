"""One Generator's view of the machine: the hardware it may use, where it computes first, in which dtype, with
which quantization the planner may rank, and the plans it makes there.

The hardware is detected afresh for each plan (free memory changes) and restricted to the Generator's device
when it has one, so that everything planned, the ladder included, stays on that card.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from .calibration import speeds_file, with_speeds
from .errors import InvalidRequestError, InvalidSettingsError
from .hardware import GIB, Hardware, detect_hardware
from .loader import resolve_dtype
from .planner import Candidate, Plan, candidate_for, effective_hardware, plan
from .profile import ModelProfile, Workload
from .quantize import quantization_for, quantization_unavailable
from .request import GenerationRequest
from .settings import ZImageSettings
from .speedups.attention import attention_available
from .strategies import FullGPU, Hybrid, LoadStrategy, PartialOffload, StreamedOffload

__all__ = ["Machine", "parse_device"]

logger = logging.getLogger(__name__)


class Machine:
    """The hardware as ``settings`` and ``device`` let one Generator see it.

    Attributes:
        hardware: as last detected (None before the first look).
        quantize: the quantization the planner may use (None: lossless only).
        prefer_lossless: whether lossless placements rank before quantized ones (``quantization="auto"``).
    """

    def __init__(self, settings: ZImageSettings, device: torch.device | None) -> None:
        self.settings = settings
        self.device = device
        self.hardware: Hardware | None = None
        self.quantize: str | None = None
        self.prefer_lossless = True

    def detect(self) -> Hardware:
        budget = self.settings.vram_budget_gib
        hardware = detect_hardware(vram_budget_bytes=None if budget is None else int(budget * GIB))
        if self.device is not None:
            hardware = hardware.restricted_to(self.device)
        if self.settings.calibrate:  # measured once per GPU model (cached); only this Generator's GPUs
            hardware = with_speeds(hardware, path=speeds_file(self.settings.cache_dir))
        self.hardware = hardware
        return hardware

    def seen(self) -> Hardware | None:
        return self.hardware

    @property
    def reserve_bytes(self) -> int:
        """GPU memory the plans keep free on each card (the ``vram_reserve_gib`` setting)."""
        return int(self.settings.vram_reserve_gib * GIB)

    def first_device(self, hardware: Hardware) -> torch.device:
        """Where the model computes unless a strategy says otherwise: the GPU with the most free memory."""
        if hardware.gpus:
            return torch.device("cuda", max(hardware.gpus, key=lambda g: g.free_bytes).index)
        return torch.device("mps" if hardware.mps else "cpu")

    def dtype_for(self, device: torch.device) -> torch.dtype:
        assert self.hardware is not None
        return resolve_dtype(self.settings.dtype, device, self.hardware)

    def gpu_devices(self) -> list[torch.device]:
        """The GPUs the Generator may use: where it measures peaks and waits for work to finish (never another
        Generator's card, whose work would then be timed as ours)."""
        assert self.hardware is not None
        return [torch.device("cuda", g.index) for g in self.hardware.gpus]

    def current(self) -> contextlib.AbstractContextManager[object]:
        """Make the Generator's GPU the thread's current CUDA device while it works: streams and hooks made
        without an explicit device (diffusers' group offloading among them) land on the current one."""
        if self.device is not None and self.device.type == "cuda" and torch.cuda.is_available():
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def check_attention(self, device: torch.device) -> None:
        """A forced attention kernel must run here: say so before loading 20 GB, not at the first image."""
        name = self.settings.attention
        reason = "" if name == "auto" else attention_available(name, device)
        if reason:
            raise InvalidSettingsError(f"attention={name!r} cannot run on {device}: {reason}")

    def resolve_quantization(self, device: torch.device) -> None:
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
        self.quantize, self.prefer_lossless = kind, setting == "auto"

    def quantized_variant(self, strategy: LoadStrategy | None, *, by_name: bool) -> LoadStrategy | None:
        """With an explicit ``quantization``, ``strategy="full_gpu"`` (``"hybrid"``, ``"partial"``, ``"streamed"``)
        by name means its quantized variant; instances, and every strategy under ``"auto"`` or ``"none"``, stay as
        they are."""
        kind = self.quantize
        if kind is None or self.prefer_lossless or not by_name:
            return strategy
        if isinstance(strategy, FullGPU) and strategy.quantize is None:
            return FullGPU(device=strategy.device, quantize=kind)
        if isinstance(strategy, (Hybrid, StreamedOffload)) and strategy.quantize is None:
            return type(strategy)(device=strategy.device, record_stream=strategy.record_stream, quantize=kind)
        if isinstance(strategy, PartialOffload) and strategy.quantize is None:
            return strategy.with_quantize(kind)
        return strategy

    def plan(self, profile: ModelProfile, work: GenerationRequest | Workload, held: dict[int, int]) -> Plan:
        """The candidates for ``work`` on the hardware now, our own weights (``held`` bytes per GPU) counted as
        free memory."""
        return self._ranked(profile, effective_hardware(self.detect(), held), work)

    def first_candidate(self, requested: LoadStrategy | None, profile: ModelProfile, hardware: Hardware) -> Candidate:
        """The requested strategy, or what 'auto' picks for a 1024x1024 image: the best fit, else the
        candidate needing the least memory."""
        if requested is not None:
            return candidate_for(requested, profile, hardware, Workload(), reserve_bytes=self.reserve_bytes)
        ranked = self._ranked(profile, hardware, Workload())
        return ranked.best or ranked.candidates[0]

    def _ranked(self, profile: ModelProfile, hardware: Hardware, work: GenerationRequest | Workload) -> Plan:
        return plan(
            profile,
            hardware,
            work,
            reserve_gib=self.settings.vram_reserve_gib,
            quantize=self.quantize,
            prefer_lossless=self.prefer_lossless,
        )


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """The device a Generator is restricted to, checked: a CUDA GPU (``cuda`` means ``cuda:0``), the CPU or MPS."""
    if device is None:
        return None
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidRequestError(f"device must be like 'cuda:1', 'cpu' or 'mps', got {device!r}") from None
    if checked.type not in ("cuda", "cpu", "mps"):
        raise InvalidRequestError(f"device must be a CUDA GPU, 'cpu' or 'mps', got {device!r}")
    return torch.device("cuda", checked.index or 0) if checked.type == "cuda" else checked
