"""This GPU's speeds, measured once and remembered: pinned host-to-device bandwidth and matmul rates.

The planner's time model was calibrated on an H200 (51.6 GiB/s pinned host-to-device, 770 TFLOP/s bf16). On a
consumer card with PCIe 4.0 (about 23 GiB/s) and 80-170 TFLOP/s, streaming a block costs twice as long and
computing it five to ten times as long, which changes which placement is fastest and how many blocks are worth
keeping resident. So the first time a GPU is used, :func:`measure_speeds` times a few copies and matrix products
(well under a second on an H200, a second or two on small cards), and the figures are kept in
``device-speeds.json`` in the library's cache folder, one entry per GPU model, driver and PyTorch version.
:func:`with_speeds` attaches them to the detected hardware; the planner rescales its time model with them
(:meth:`~zimage_turbo.profile.ModelProfile.on`) and says in its footnote which speeds it used.

Nothing is measured on a machine without a CUDA GPU, and ``calibrate=False`` (``ZIMAGE_CALIBRATE=0``) skips it:
the planner then uses the H200's figures. A damaged cache file is measured again and rewritten.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from .hardware import DeviceSpeeds, GPUInfo, Hardware
from .json_files import replace_json
from .settings import library_cache_dir

__all__ = [
    "SPEEDS_FILE",
    "gpu_key",
    "gpu_speeds",
    "measure_speeds",
    "read_speeds",
    "speeds_file",
    "speeds_for",
    "with_speeds",
    "write_speeds",
]

logger = logging.getLogger(__name__)

SPEEDS_FILE = "device-speeds.json"
# Bytes per timed copy: large enough that a copy runs at the link's full rate, small enough to pin in a blink
# (pinning costs about 1.6 GB/s on first touch in some VMs).
COPY_BYTES = 256 * 2**20
# Side of the square matrices multiplied: the planner's reference rate (CALIBRATION_BF16_TFLOPS) was measured so.
MATMUL_SIDE = 8192
# fp8 matrix products need Ada or Hopper (compute capability 8.9) or newer.
FP8_CAPABILITY = (8, 9)
_WARM_UPS = 3
_TIMED = 10

# Speeds found in this process, by key; keys whose measurement failed (not measured again in this process).
_found: dict[str, DeviceSpeeds] = {}
_failed: set[str] = set()
_lock = threading.Lock()


def speeds_file(cache_root: Path | None) -> Path:
    """Where measured speeds are kept: ``<cache_dir>/device-speeds.json``, or under ``~/.cache/zimage-turbo``."""
    return library_cache_dir(cache_root) / SPEEDS_FILE


@cache
def gpu_key(index: int) -> str:
    """What measured speeds depend on: the GPU model, the driver and PyTorch's version (its copy and matmul
    kernels)."""
    return f"{torch.cuda.get_device_name(index)} | driver {_driver_version()} | torch {torch.__version__}"


def _driver_version() -> str:
    try:
        text = Path("/proc/driver/nvidia/version").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    found = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9][0-9.]*)", text)
    if found:
        return found.group(1)
    version = getattr(torch._C, "_cuda_getDriverVersion", None)  # the CUDA version the driver supports
    if version is not None:
        try:
            number = int(version())
        except (RuntimeError, TypeError, ValueError):
            return "unknown"
        return f"cuda {number // 1000}.{number % 1000 // 10}"
    return "unknown"


def read_speeds(path: Path) -> dict[str, DeviceSpeeds]:
    """The speeds kept in ``path`` by key; entries that cannot be read are left out (a damaged file: none)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("speeds") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        return {}
    found = {}
    for key, entry in entries.items():
        speeds = _from_dict(entry)
        if speeds is not None:
            found[str(key)] = speeds
    return found


def _from_dict(entry: Any) -> DeviceSpeeds | None:
    if not isinstance(entry, Mapping):
        return None
    h2d, bf16, fp8 = (_positive(entry.get(key)) for key in ("h2d_gib_per_s", "bf16_tflops", "fp8_tflops"))
    if h2d is None or bf16 is None or (fp8 is None and entry.get("fp8_tflops") is not None):
        return None
    return DeviceSpeeds(h2d, bf16, fp8, str(entry.get("name", "")))


def _positive(value: Any) -> float | None:
    """``value`` as a float if it is a finite positive number (a bool is not), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def write_speeds(path: Path, entries: Mapping[str, DeviceSpeeds]) -> None:
    """Replace ``path`` with these entries at once (a reader never sees half a file); a folder that cannot be
    written only means measuring again next time."""
    data = {
        "about": "zimage-turbo's measured GPU speeds (zimage_turbo.calibration); delete to measure again",
        "speeds": {key: {k: v for k, v in s.to_dict().items() if k != "source"} for key, s in entries.items()},
    }
    replace_json(path, data, what="the measured GPU speeds")


def speeds_for(key: str, path: Path, measure: Callable[[], DeviceSpeeds]) -> DeviceSpeeds:
    """The speeds of the GPU ``key`` names: found earlier in this process, else kept in ``path``, else
    ``measure()``-d now and kept there (other keys in the file stay)."""
    with _lock:
        if key in _found:
            return _found[key]
        kept = read_speeds(path).get(key)
        if kept is not None:
            speeds = replace(kept, source="cached")
        else:
            speeds = replace(measure(), source="measured")
            entries = read_speeds(path)
            entries[key] = speeds
            write_speeds(path, entries)
            logger.info("measured %s: %s", key, speeds.describe())
        _found[key] = speeds
        return speeds


def gpu_speeds(index: int, path: Path) -> DeviceSpeeds:
    """The speeds of ``cuda:<index>``, measured the first time (see :func:`speeds_for`)."""
    device = torch.device("cuda", index)
    return speeds_for(gpu_key(index), path, lambda: measure_speeds(device))


def with_speeds(
    hardware: Hardware, *, path: Path, lookup: Callable[[GPUInfo, Path], DeviceSpeeds] | None = None
) -> Hardware:
    """``hardware`` with the speeds of each of its GPUs (those it has already are kept), found by ``lookup``
    (by default :func:`gpu_speeds`). Nothing happens without a GPU, nor, by default, where CUDA is not available.
    A GPU whose measurement fails (its memory is full) is planned with the H200's figures; the failure is logged
    and not retried in this process."""
    if not hardware.gpus or (lookup is None and not _cuda_here()):
        return hardware  # no GPU to measure (hardware described by hand on a machine without one)
    find = lookup or (lambda gpu, where: gpu_speeds(gpu.index, where))
    gpus = []
    for gpu in hardware.gpus:
        speeds = gpu.speeds
        if speeds is None and gpu.name not in _failed:
            try:
                speeds = find(gpu, path)
            except Exception as exc:  # a measurement only refines the plan: it never stops one
                _failed.add(gpu.name)
                logger.warning("could not measure the speeds of %s (%s); planning with the H200's", gpu.device, exc)
        gpus.append(replace(gpu, speeds=speeds))
    return replace(hardware, gpus=tuple(gpus))


def _cuda_here() -> bool:
    """A CUDA build of PyTorch that sees a GPU."""
    return bool(torch.backends.cuda.is_built()) and torch.cuda.is_available()  # type: ignore[no-untyped-call]


def measure_speeds(device: torch.device) -> DeviceSpeeds:
    """Time pinned host-to-device copies and dense matrix products on ``device`` (a CUDA GPU): the medians of a
    few runs each, after warm-ups. Uses about 0.6 GiB of the GPU briefly and gives it back."""
    if device.type != "cuda":
        raise ValueError(f"speeds are measured on CUDA GPUs only, not on {device}")
    with torch.cuda.device(device):
        try:
            bandwidth = _copy_rate(device)
            bf16 = _matmul_rate(device, torch.bfloat16)
            fp8 = _fp8_rate(device)
        finally:
            torch.cuda.empty_cache()
            empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
            if empty_host_cache is not None:
                empty_host_cache()  # the pinned source buffer would otherwise stay cached for this process
    return DeviceSpeeds(bandwidth, bf16, fp8, name=torch.cuda.get_device_name(device), source="measured")


def _timed(device: torch.device, run: Callable[[], object]) -> list[float]:
    """Seconds of each of ``_TIMED`` runs after ``_WARM_UPS``, by CUDA events on the current stream."""
    for _ in range(_WARM_UPS):
        run()
    seconds = []
    for _ in range(_TIMED):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        run()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    return seconds


def _copy_rate(device: torch.device) -> float:
    source = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    seconds = _timed(device, lambda: target.copy_(source, non_blocking=True))
    return COPY_BYTES / statistics.median(seconds) / 2**30


def _matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of products of two 8192x8192 matrices, in bf16 or (``torch.float8_e4m3fn``) fp8 with bf16 output;
    fp8 raises RuntimeError where this build has no kernel for the card."""
    n = MATMUL_SIDE
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    if dtype == torch.bfloat16:
        run: Callable[[], object] = lambda: a @ b  # noqa: E731
    else:
        a8, b8 = a.to(dtype), b.to(dtype).t()  # the second operand column-major, as scaled matmuls want it
        one = torch.ones((), device=device, dtype=torch.float32)
        del a, b

        def run() -> object:
            return torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    return 2 * n**3 / statistics.median(_timed(device, run)) / 1e12


def _fp8_rate(device: torch.device) -> float | None:
    """The fp8 matmul rate, or None on cards without fp8 (compute capability below 8.9) or kernels for it."""
    if torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
        return None
    try:
        return _matmul_rate(device, torch.float8_e4m3fn)
    except RuntimeError as exc:
        logger.debug("no fp8 matmul on %s: %s", device, exc)
        return None
