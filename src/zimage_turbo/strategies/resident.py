"""Strategies that keep every component resident on one device: the fastest, when it fits."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import StrategyUnavailableError
from ..hardware import Hardware
from .base import LoadStrategy

__all__ = ["CPUOnly", "FullGPU"]


class FullGPU(LoadStrategy):
    """All components on one GPU (CUDA, or Apple MPS when there is no CUDA device).

    Args:
        gpu: index of the CUDA device to use.
    """

    name: ClassVar[str] = "full_gpu"

    def __init__(self, gpu: int = 0) -> None:
        self.gpu = gpu

    def load_device(self, hardware: Hardware) -> torch.device:
        if hardware.gpus:
            if not any(g.index == self.gpu for g in hardware.gpus):
                raise StrategyUnavailableError(
                    f"full_gpu: there is no cuda:{self.gpu}; visible GPUs: "
                    + ", ".join(g.device for g in hardware.gpus)
                )
            return torch.device("cuda", self.gpu)
        if hardware.mps:
            return torch.device("mps")
        raise StrategyUnavailableError("full_gpu needs a CUDA or MPS GPU, and none was found; use strategy='cpu'")

    def apply(self, pipe: Any, hardware: Hardware) -> None:
        pipe.to(self.load_device(hardware))

    def remove(self, pipe: Any) -> None:
        pipe.to("cpu")

    def __repr__(self) -> str:
        return f"FullGPU(gpu={self.gpu})"


class CPUOnly(LoadStrategy):
    """Everything on the CPU: works anywhere, slowly (minutes per 1024x1024 image with the real model)."""

    name: ClassVar[str] = "cpu"

    def load_device(self, hardware: Hardware) -> torch.device:
        return torch.device("cpu")

    def apply(self, pipe: Any, hardware: Hardware) -> None:
        pipe.to("cpu")

    def remove(self, pipe: Any) -> None:
        """Nothing to undo: the weights already live in host memory."""
