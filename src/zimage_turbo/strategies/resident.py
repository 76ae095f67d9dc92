"""Strategies that keep every component resident on one device: the fastest, when it fits."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, ClassVar

import torch

from ..hardware import Hardware
from ..profile import ModelProfile, Workload
from .base import (
    COMPONENTS,
    CONTROLNET,
    LoadStrategy,
    MemoryEstimate,
    QuantizableTransformer,
    component_names,
    on_one_gpu,
    send_everything_home,
)

__all__ = ["CPUOnly", "FullGPU"]

# A CPU runs the transformer at a small fraction of a GPU's rate; a rough figure for predictions only.
CPU_TFLOP_PER_S = 0.5


class FullGPU(QuantizableTransformer):
    """All components on one GPU: nothing moves per image. Needs about 21.7 GiB at 1024x1024 in bf16 (a ControlNet,
    once loaded, stays there too: 6.7 GB more for the Union 2.1's).

    Args:
        device: see :class:`LoadStrategy`.
        quantize: ``"fp8"`` or ``"int8"`` to quantize the transformer's large linear layers (torchao; about
            15 GiB at 1024x1024; the image changes a little). Their bf16 weights stay in host memory, so
            that switching to another strategy needs no reload.
    """

    name: ClassVar[str] = "full_gpu"
    offloads: ClassVar[bool] = False

    def __init__(self, device: str | torch.device | None = None, quantize: str | None = None) -> None:
        super().__init__(device)
        self._set_quantize(quantize)

    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        resident = profile.weight_bytes - profile.transformer.weight_bytes + self._transformer_bytes(profile)
        acts = profile.activation_bytes(work)
        weights = dict.fromkeys(acts, resident)
        return on_one_gpu(self.gpu_index(hardware), weights, acts, pinned=self._quantized_host_bytes(profile))

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        return sum(self._compute_seconds(profile, work, steps).values())

    def apply(self, pipe: Any, hardware: Hardware) -> None:
        self._place(pipe, component_names(pipe), self.place_on(hardware))

    def remove(self, pipe: Any, keep: Collection[str] = ()) -> None:
        send_everything_home(pipe, self._restore(pipe, keep))
        self.placed_off()

    def resident(self, hardware: Hardware) -> dict[str, torch.device]:
        device = self.target(hardware)
        return dict.fromkeys((*COMPONENTS, CONTROLNET), device)


class CPUOnly(LoadStrategy):
    """Everything on the CPU: works anywhere, slowly (many minutes per 1024x1024 image with the real model)."""

    name: ClassVar[str] = "cpu"
    offloads: ClassVar[bool] = False
    compilable: ClassVar[bool] = True

    def target(self, hardware: Hardware) -> torch.device:
        return torch.device("cpu")

    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        activations = max(profile.activation_bytes(work).values())
        # Activations live in host RAM too (float32 on a CPU: twice the bf16 estimate).
        return MemoryEstimate(gpu_peak={}, host_bytes=profile.weight_bytes + 2 * activations)

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        return steps * profile.transformer_pass_tflop(work) / CPU_TFLOP_PER_S

    def apply(self, pipe: Any, hardware: Hardware) -> None:
        send_everything_home(pipe)

    def remove(self, pipe: Any, keep: Collection[str] = ()) -> None:
        """Nothing to undo: the weights already live in host memory."""
