"""What the machine has: GPUs, their memory, host RAM.

:class:`Hardware` is plain frozen data so that planning can be tested with hand-built values::

    Hardware(gpus=(GPUInfo(0, "RTX 4090", total_bytes=24 * GIB, free_bytes=23 * GIB,
                           compute_capability=(8, 9)),),
             host_total_bytes=64 * GIB, host_available_bytes=48 * GIB)

:func:`detect_hardware` fills it from the running machine. The free memory it reports is what *this
process* can allocate, which is not what ``torch.cuda.mem_get_info`` says when the process runs under
``torch.cuda.set_per_process_memory_fraction`` (the driver does not know about that cap) or under a
user budget for shared cards.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

import psutil
import torch

from .errors import StrategyUnavailableError

__all__ = [
    "GIB",
    "DeviceSpeeds",
    "GPUInfo",
    "Hardware",
    "detect_hardware",
    "host_peak_rss_bytes",
    "usable_gpu_bytes",
]

GIB = 1024**3

# Ampere (8.0) is the first generation with native bf16 matmul. torch.cuda.is_bf16_supported() also says
# yes on a T4 (7.5) because it emulates bf16, slowly; so we decide from the compute capability.
NATIVE_BF16_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class DeviceSpeeds:
    """What a GPU moves and computes per second, as the planner's time model uses it.

    ``h2d_gib_per_s``: copies from pinned host memory to the GPU; ``bf16_tflops`` (and ``fp8_tflops``, None
    where fp8 matmuls cannot run or were not measured): dense matrix products of 8192x8192 matrices.
    ``source`` says where the figures come from (``"measured"``, ``"cached"``: measured by an earlier process,
    ``"given"``: typed in, ``"reference"``: the calibration GPU's). Build by hand for hypothetical cards::

        DeviceSpeeds(h2d_gib_per_s=23.0, bf16_tflops=160.0, name="PCIe 4.0 consumer card", source="given")
    """

    h2d_gib_per_s: float
    bf16_tflops: float
    fp8_tflops: float | None = None
    name: str = ""
    source: str = "given"

    def describe(self) -> str:
        """``"23.0 GiB/s pinned host-to-device, 160 TFLOP/s bf16 (given)"``."""
        fp8 = f", {self.fp8_tflops:.0f} fp8" if self.fp8_tflops else ""
        return (
            f"{self.h2d_gib_per_s:.1f} GiB/s pinned host-to-device, {self.bf16_tflops:.0f} TFLOP/s bf16{fp8} "
            f"({self.source})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "h2d_gib_per_s": self.h2d_gib_per_s,
            "bf16_tflops": self.bf16_tflops,
            "fp8_tflops": self.fp8_tflops,
            "name": self.name,
            "source": self.source,
        }


@dataclass(frozen=True)
class GPUInfo:
    """One CUDA device as this process sees it; ``speeds`` once measured (see :mod:`zimage_turbo.calibration`)."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int]
    memory_fraction: float = 1.0
    speeds: DeviceSpeeds | None = None

    @property
    def device(self) -> str:
        """The torch device string, e.g. ``"cuda:0"``."""
        return f"cuda:{self.index}"

    @property
    def bf16(self) -> bool:
        """Native bfloat16 support (compute capability 8.0 or newer)."""
        return self.compute_capability >= NATIVE_BF16_CAPABILITY

    @property
    def limit_bytes(self) -> int:
        """Total memory this process may use on the card (the fraction cap applied)."""
        return int(self.total_bytes * self.memory_fraction)


@dataclass(frozen=True)
class Hardware:
    """The devices available to this process."""

    gpus: tuple[GPUInfo, ...] = ()
    host_total_bytes: int = 0
    host_available_bytes: int = 0
    mps: bool = False

    @property
    def accelerator(self) -> str:
        """``"cuda"``, ``"mps"`` or ``"cpu"``: the best kind of device present."""
        if self.gpus:
            return "cuda"
        return "mps" if self.mps else "cpu"

    def restricted_to(self, device: str | torch.device) -> Hardware:
        """This hardware as seen by something that may use only ``device`` (``"cuda:1"``, ``"cpu"``, ``"mps"``):
        the other GPUs disappear, so every strategy planned on the result runs on that device alone.

        Raises :class:`~zimage_turbo.errors.StrategyUnavailableError` when the device is not here.
        """
        wanted = torch.device(device)
        if wanted.type == "cuda":
            index = wanted.index or 0
            gpus = tuple(g for g in self.gpus if g.index == index)
            if not gpus:
                visible = ", ".join(g.device for g in self.gpus) or "none"
                raise StrategyUnavailableError(f"there is no cuda:{index}; visible GPUs: {visible}")
            return replace(self, gpus=gpus, mps=False)
        if wanted.type == "mps" and not self.mps:
            raise StrategyUnavailableError("there is no Apple MPS device here")
        return replace(self, gpus=(), mps=wanted.type == "mps")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, as printed by ``zimage-turbo hardware --json`` (sizes in bytes)."""
        return {
            "gpus": [
                {
                    "index": gpu.index,
                    "device": gpu.device,
                    "name": gpu.name,
                    "total_bytes": gpu.total_bytes,
                    "free_bytes": gpu.free_bytes,
                    "compute_capability": list(gpu.compute_capability),
                    "memory_fraction": gpu.memory_fraction,
                    "bf16": gpu.bf16,
                    "speeds": None if gpu.speeds is None else gpu.speeds.to_dict(),
                }
                for gpu in self.gpus
            ],
            "mps": self.mps,
            "accelerator": self.accelerator,
            "host_total_bytes": self.host_total_bytes,
            "host_available_bytes": self.host_available_bytes,
        }

    def describe(self) -> str:
        """A few human-readable lines, as printed by ``zimage-turbo hardware``."""
        lines = []
        for gpu in self.gpus:
            cap = f" (capped to {gpu.memory_fraction:.0%})" if gpu.memory_fraction < 1 else ""
            lines.append(
                f"{gpu.device}: {gpu.name}, {gpu.total_bytes / GIB:.1f} GiB total{cap}, "
                f"{gpu.free_bytes / GIB:.1f} GiB usable, compute capability "
                f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}, "
                f"bf16 {'native' if gpu.bf16 else 'not native'}"
            )
            if gpu.speeds is not None:
                lines.append(f"  speeds: {gpu.speeds.describe()}")
        if not self.gpus:
            lines.append("Apple MPS device" if self.mps else "no GPU: the CPU will run the model (slow)")
        lines.append(
            f"host RAM: {self.host_total_bytes / GIB:.1f} GiB total, "
            f"{self.host_available_bytes / GIB:.1f} GiB available"
        )
        return "\n".join(lines)


def usable_gpu_bytes(
    *,
    driver_free: int,
    total: int,
    fraction: float,
    reserved: int,
    allocated: int,
    budget: int | None = None,
) -> int:
    """Bytes this process can still allocate on one GPU.

    ``driver_free`` (from ``mem_get_info``) counts every process but ignores our own fraction cap, and
    it does not count memory that our caching allocator holds but has not handed out
    (``reserved - allocated``), which we can reuse. The fraction cap and a user budget limit what the
    allocator may hold in total, of which ``allocated`` is taken already.
    """
    reusable = max(reserved - allocated, 0)
    free = driver_free + reusable
    free = min(free, int(total * fraction) - allocated)
    if budget is not None:
        free = min(free, budget - allocated)
    return max(free, 0)


def detect_hardware(*, vram_budget_bytes: int | None = None) -> Hardware:
    """Read the GPUs and host memory of this machine.

    Creates a CUDA context on every visible GPU (that is how ``mem_get_info`` works); set
    ``CUDA_VISIBLE_DEVICES`` to keep the library off cards it should not touch.
    """
    memory = psutil.virtual_memory()
    gpus = tuple(_detect_gpu(i, vram_budget_bytes) for i in range(torch.cuda.device_count()))
    mps_backend = getattr(torch.backends, "mps", None)
    mps = bool(not gpus and mps_backend is not None and mps_backend.is_available())
    return Hardware(
        gpus=gpus,
        host_total_bytes=int(memory.total),
        host_available_bytes=int(memory.available),
        mps=mps,
    )


def _detect_gpu(index: int, budget: int | None) -> GPUInfo:
    props = torch.cuda.get_device_properties(index)
    driver_free, total = torch.cuda.mem_get_info(index)
    # Readable since torch 2.7; before that we cannot see the cap and assume none.
    read_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = float(read_fraction(index)) if read_fraction is not None else 1.0
    usable = usable_gpu_bytes(
        driver_free=int(driver_free),
        total=int(total),
        fraction=fraction,
        reserved=int(torch.cuda.memory_reserved(index)),
        allocated=int(torch.cuda.memory_allocated(index)),
        budget=budget,
    )
    return GPUInfo(
        index=index,
        name=str(props.name),
        total_bytes=int(total),
        free_bytes=usable,
        compute_capability=(int(props.major), int(props.minor)),
        memory_fraction=fraction,
    )


def host_peak_rss_bytes() -> int:
    """The highest resident memory of this process so far (pinned host buffers included)."""
    try:
        import resource
    except ImportError:  # Windows
        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024)
