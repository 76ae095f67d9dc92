"""What the ``zimage-turbo`` command prints: the ``--json`` object, a result's summary, and logging."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "MODEL_COMMANDS",
    "add_json_option",
    "configure_logging",
    "print_json",
    "report",
    "result_json",
]

logger = logging.getLogger("zimage_turbo")

# the command's exit statuses (docs/usage.md)
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_json_option(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument(
        "--json", action="store_true", help=f"print one JSON object on stdout ({what}; docs/usage.md) and nothing else"
    )


def print_json(args: argparse.Namespace, answer: dict[str, Any]) -> None:
    """The one object a --json run prints, on the real stdout (main sends every other print to stderr)."""
    print(json.dumps(answer), file=args.stdout)


# The commands that import diffusers and transformers: -q silences their progress bars too.
MODEL_COMMANDS = frozenset({"generate", "demo", "make-checkpoint", "batch"})


def result_json(result: Any, written: list[Path]) -> dict[str, Any]:
    """What ``generate --json`` prints (docs/usage.md lists the keys)."""
    return {
        "paths": [str(path.resolve()) for path in written],
        "prompt": result.prompt,
        "seeds": list(result.seeds),
        "width": result.width,
        "height": result.height,
        "steps": result.steps,
        "guidance_scale": result.guidance_scale,
        "strategy": result.strategy,
        "device": result.device,
        "dtype": result.dtype,
        "attention": result.attention,
        "compiled": list(result.compiled),
        "quantization": result.quantization,
        "vae_tiling": result.vae_tiling,
        "timings": result.timings.to_dict(),
        "peak_memory_bytes": dict(result.peak_memory),
        "predicted_peak_memory_bytes": dict(result.predicted_peak_memory),
        "fallbacks": [
            {"kind": f.kind, "before": f.before, "after": f.after, "phase": f.phase, "reason": f.reason}
            for f in result.fallbacks
        ],
        "warnings": list(result.warnings),
        "task": result.task,
        **({"strength": result.strength, "input_sizes": dict(result.input_sizes)} if result.input_sizes else {}),
        **({"control_scale": result.control_scale, "controlnet": result.controlnet} if result.controlnet else {}),
    }


def report(result: Any, written: list[Path]) -> None:
    timings = result.timings
    names = ", ".join(str(path.resolve()) for path in written)
    print(f"Saved {names}")
    print(
        f"  {result.width}x{result.height}, {result.steps} steps, seed {result.seed}, strategy {result.strategy} "
        f"on {result.device} ({result.dtype})"
    )
    load = f"load {timings.load:.1f} s, " if timings.load else ""
    prepare = f"prepare {timings.prepare:.2f} s, " if timings.prepare >= 0.05 else ""  # a new shape's kernel timed
    image = f"encode image {timings.encode_image:.2f} s, " if result.input_sizes else ""
    print(
        f"  {timings.total:.2f} s: {load}{prepare}encode {timings.encode:.2f} s, {image}"
        f"denoise {timings.denoise:.2f} s, decode {timings.decode:.2f} s"
    )
    if result.control_scale is not None:
        task = result.task.replace("_", "-")
        print(f"  {task} with the ControlNet {result.controlnet} at scale {result.control_scale:g}")
    elif result.input_sizes:
        print(f"  {result.task.replace('_', '-')} at strength {result.strength:g}")
    peaks = ", ".join(f"{device} {value / 2**30:.2f} GiB" for device, value in result.peak_memory.items())
    print(f"  peak memory: {peaks}")
    if result.vae_tiling:
        print("  VAE decoded in tiles")
    for fallback in result.fallbacks:
        print(f"  fallback: {fallback}")
    for warning in result.warnings:
        print(f"  warning: {warning}")


def configure_logging(*, quiet: bool, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
