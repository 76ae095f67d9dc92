"""The ``plan`` and ``hardware`` commands: what the library sees, and how a request would be placed on this
machine or on hypothetical hardware (``--gpus 2x12``), without loading weights."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from .cli_output import EXIT_OK, print_json
from .errors import InvalidRequestError
from .settings import ZImageSettings

if TYPE_CHECKING:
    from .hardware import DeviceSpeeds, Hardware

__all__ = ["MAX_GIB", "cmd_hardware", "cmd_plan", "gib", "parse_gpus", "parse_size"]


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(part.strip().isdecimal() for part in parts):
        raise InvalidRequestError(f"--size must look like 1024x768 (WIDTHxHEIGHT), got {text!r}")
    return int(parts[0]), int(parts[1])


# The largest memory amount `plan` accepts, in GiB (1 PiB): hypothetical, but still a number of bytes.
MAX_GIB = 1 << 20


def parse_gpus(text: str) -> list[float]:
    """'2x12' -> [12, 12]; '24,12' -> [24, 12] (GiB)."""
    try:
        if "x" in text.lower():
            count, size = text.lower().split("x")
            if not 1 <= int(count) <= 64:
                raise ValueError
            sizes = [float(size)] * int(count)
        else:
            sizes = [float(part) for part in text.split(",")]
    except ValueError:
        raise InvalidRequestError(
            f"--gpus must look like 2x12 or 24,12 (GiB each, 1 to 64 GPUs), got {text!r}"
        ) from None
    if not sizes or not all(math.isfinite(size) and 0 < size <= MAX_GIB for size in sizes):
        raise InvalidRequestError(f"--gpus needs sizes above 0 and at most {MAX_GIB} GiB each, got {text!r}")
    return sizes


def gib(option: str, value: float | None, *, zero_ok: bool = False) -> float | None:
    """A memory size given in GiB on the command line: finite, positive (or zero where that means none), and
    at most MAX_GIB (a larger number overflows the byte counts)."""
    if value is not None and not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0) and value <= MAX_GIB):
        raise InvalidRequestError(
            f"{option} must be a {'non-negative' if zero_ok else 'positive'} number of GiB up to {MAX_GIB}, got {value}"
        )
    return value


def cmd_plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .hardware import GIB, GPUInfo
    from .planner import plan
    from .profile import ModelProfile
    from .request import GenerationRequest
    from .sources import resolve_model

    width, height = parse_size(args.size)
    if args.vram_gib is not None and args.gpus is not None:
        raise InvalidRequestError("--vram-gib describes one GPU and --gpus several: give one of them")
    gib("--vram-gib", args.vram_gib)
    gib("--ram-gib", args.ram_gib)
    gib("--reserve-gib", args.reserve_gib, zero_ok=True)
    request = GenerationRequest(
        prompt="plan",
        height=height,
        width=width,
        steps=args.steps,
        num_images=args.num_images,
        guidance_scale=args.guidance,
    )
    dtype_bytes = 4 if args.dtype == "float32" else 2
    if args.model:
        settings = ZImageSettings(model=args.model, progress=not args.quiet)
        profile = ModelProfile.from_layout(resolve_model(settings).layout, dtype_bytes=dtype_bytes)
    else:
        profile = ModelProfile.z_image_turbo(dtype_bytes=dtype_bytes)
    sizes = parse_gpus(args.gpus) if args.gpus else [args.vram_gib] if args.vram_gib is not None else None
    given = _given_speeds(args)
    # this machine's GPUs are measured (once; see calibration.py) unless hypothetical ones replace them
    hardware = _this_machine(measure=sizes is None and given is None)
    if sizes is not None:
        gpus = tuple(
            GPUInfo(i, "hypothetical GPU", int(size * GIB), int(size * GIB), compute_capability=(8, 9))
            for i, size in enumerate(sizes)
        )
        hardware = replace(hardware, gpus=gpus, mps=False)
    if given is not None:
        hardware = replace(hardware, gpus=tuple(replace(gpu, speeds=given) for gpu in hardware.gpus))
    if args.ram_gib is not None:
        hardware = replace(
            hardware, host_total_bytes=int(args.ram_gib * GIB), host_available_bytes=int(args.ram_gib * GIB)
        )
    reserve = args.reserve_gib if args.reserve_gib is not None else ZImageSettings().vram_reserve_gib
    ranking = plan(profile, hardware, request, reserve_gib=reserve)
    if args.json:
        print_json(args, ranking.to_dict())
    else:
        print(ranking.describe())
    return EXIT_OK


def _this_machine(*, measure: bool) -> Hardware:
    """The hardware detected here, with each GPU's speeds when ``measure`` and the ``calibrate`` setting allow."""
    from .calibration import speeds_file, with_speeds
    from .hardware import detect_hardware

    hardware = detect_hardware()
    settings = ZImageSettings()
    if measure and settings.calibrate:
        hardware = with_speeds(hardware, path=speeds_file(settings.cache_dir))
    return hardware


def _given_speeds(args: argparse.Namespace) -> DeviceSpeeds | None:
    """Speeds typed on the command line (--h2d-gib-s, --bf16-tflops), the calibration GPU's for the one left
    out; None when neither is given."""
    from .activation_model import load_calibration
    from .hardware import DeviceSpeeds

    if args.h2d_gib_s is None and args.bf16_tflops is None:
        return None
    for option, value in (("--h2d-gib-s", args.h2d_gib_s), ("--bf16-tflops", args.bf16_tflops)):
        if value is not None and not (math.isfinite(value) and 0 < value <= MAX_GIB):
            raise InvalidRequestError(f"{option} must be a positive number, got {value}")
    reference = load_calibration().speeds
    return DeviceSpeeds(
        args.h2d_gib_s if args.h2d_gib_s is not None else reference.h2d_gib_per_s,
        args.bf16_tflops if args.bf16_tflops is not None else reference.bf16_tflops,
        name="as given",
        source="given",
    )


def cmd_hardware(args: argparse.Namespace) -> int:
    hardware = _this_machine(measure=True)
    if args.json:
        print_json(args, hardware.to_dict())
    else:
        print(hardware.describe())
    return EXIT_OK
