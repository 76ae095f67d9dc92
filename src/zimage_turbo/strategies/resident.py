"""Strategies that keep every component resident on one device: the fastest, when it fits."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, ClassVar

import torch

from ..hardware import Hardware
from ..profile import ModelProfile, Workload
from .base import LoadStrategy, MemoryEstimate, components, host_homes, peaks_over_phases, send_everything_home

__all__ = ["CPUOnly", "FullGPU"]

# A CPU runs the transformer at a small fraction of a GPU's rate; a rough figure for predictions only.
CPU_TFLOP_PER_S = 0.5


def _on_one_device(profile: ModelProfile, work: Workload, gpu: int, resident: int) -> MemoryEstimate:
    activations = profile.activation_bytes(work)
    return peaks_over_phases(
        {phase: {gpu: resident} for phase in activations},
        {phase: {gpu: value} for phase, value in activations.items()},
    )


class FullGPU(LoadStrategy):
    """All components on one GPU: nothing moves per image. Needs about 21.7 GiB at 1024x1024 in bf16."""

    name: ClassVar[str] = "full_gpu"
    offloads: ClassVar[bool] = False

    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        return _on_one_device(profile, work, self.gpu_index(hardware), profile.weight_bytes)

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        return sum(profile.compute_seconds(work, steps).values())

    def apply(self, pipe: Any, hardware: Hardware) -> None:
        device = self.place_on(hardware)
        homes = host_homes(pipe)
        modules = list(components(pipe).values())
        for module in modules:
            homes.send_to(module, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # The GPU copy is now the only one we need: free the host RAM. remove() copies back if ever needed.
        for module in modules:
            homes.release(module)

    def remove(self, pipe: Any, keep: Collection[str] = ()) -> None:
        send_everything_home(pipe, keep)
        self.placed_off()

    def resident(self, hardware: Hardware) -> dict[str, torch.device]:
        device = self.target(hardware)
        return dict.fromkeys(("text_encoder", "transformer", "vae"), device)


class CPUOnly(LoadStrategy):
    """Everything on the CPU: works anywhere, slowly (many minutes per 1024x1024 image with the real model)."""

    name: ClassVar[str] = "cpu"
    offloads: ClassVar[bool] = False

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
