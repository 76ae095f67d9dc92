"""The ``zimage-turbo`` command (also ``python -m zimage_turbo``).

    zimage-turbo generate "a red fox in the snow" -o fox.png --seed 7 --size 1024x768
    zimage-turbo generate "the fox in spring" --image fox.png [--strength 0.6] [--mask mask.png] -o spring.png
    zimage-turbo generate "a fox, same pose" --control edges.png --controlnet DIR_OR_REPO [--control-scale 0.75]
    zimage-turbo demo                      # tiny random-weight model, no download: checks the install
    zimage-turbo make-checkpoint tiny DIR  # or: full DIR (real sizes, random weights; needs a GPU)
    zimage-turbo hardware                  # what the library sees
    zimage-turbo info fox.png [--json]     # how a saved image was made
    zimage-turbo bench --checkpoint DIR --out FILE.json   # against plain diffusers, every VRAM budget
    zimage-turbo batch prompts.jsonl --out DIR [--ray ADDRESS]   # many prompts; rerun to resume

Exit status: 0 success, 2 bad arguments or settings (or a batch folder in use), 1 any other error, 130
interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .cli_output import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    MODEL_COMMANDS,
    configure_logging,
    print_json,
    report,
    result_json,
)
from .cli_parser import build_parser, parse_lora, settings_from
from .cli_plan import cmd_hardware, cmd_plan, parse_size
from .errors import (
    BatchLockedError,
    InvalidRequestError,
    InvalidSettingsError,
    LoraError,
    UnknownStrategyError,
    ZImageError,
)
from .progress import library_progress_bars
from .settings import ZImageSettings

__all__ = ["main", "parse_lora"]

logger = logging.getLogger("zimage_turbo")

DEMO_PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"
DEMO_SIZE = 512


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        # The harness has its own parser (also used by benchmarks/run.py): hand it every argument.
        from .bench.runner import main as bench_main

        return bench_main(arguments[1:])
    parser = _parser()
    args = parser.parse_args(arguments)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    configure_logging(quiet=args.quiet, verbose=args.verbose)
    # With --json, stdout carries the JSON object alone: anything else printed goes to stderr.
    args.stdout = sys.stdout
    answers_in_json = getattr(args, "json", False)
    try:
        with (
            contextlib.redirect_stdout(sys.stderr) if answers_in_json else contextlib.nullcontext(),
            library_progress_bars(enabled=not (args.quiet and args.command in MODEL_COMMANDS)),
        ):
            return int(args.handler(args))
    # A folder in use by another batch, or a LoRA that cannot be used, is the caller's to sort out, like a bad
    # argument: same status.
    except (InvalidRequestError, InvalidSettingsError, UnknownStrategyError, BatchLockedError, LoraError) as exc:
        print(f"zimage-turbo: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ZImageError as exc:
        print(f"zimage-turbo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("zimage-turbo: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        # main() may be called in-process (tests, notebooks): leave the library's logger as we found it.
        logger.handlers[:], logger.level, logger.propagate = saved


def _parser() -> argparse.ArgumentParser:
    """The command line's parser, each command calling its handler here."""
    handlers = {
        "generate": _cmd_generate,
        "demo": _cmd_demo,
        "make-checkpoint": _cmd_make_checkpoint,
        "convert": _cmd_convert,
        "hardware": cmd_hardware,
        "info": _cmd_info,
        "plan": cmd_plan,
        "batch": _cmd_batch,
    }
    return build_parser(handlers)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generator import Generator
    from .loras import read_lora_source
    from .request import DEFAULT_SIDE, GenerationRequest
    from .result import check_output_path, entered_path, output_paths
    from .task_inputs import task_inputs

    width, height = parse_size(args.size) if args.size is not None else (None, None)
    # Every argument, then every output path and the settings, are checked before anything is loaded (the
    # Generator loads lazily, and generate() validates again before loading).
    inputs = task_inputs(args.image, args.mask, args.strength, args.control, args.control_scale)
    if inputs is not None:
        height, width = inputs.output_size(height, width)
    request = GenerationRequest(
        args.prompt,
        height=height or DEFAULT_SIDE,
        width=width or DEFAULT_SIDE,
        steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        seed=args.seed,
        inputs=inputs,
    )
    output = entered_path(args.output)
    for target in output_paths(output, request.num_images):
        check_output_path(target, overwrite=args.overwrite)
    settings = settings_from(args)
    loras = [
        read_lora_source(src, scale=scale, name=None, weight_name=None, settings=settings) for src, scale in args.lora
    ]
    generator = Generator(settings=settings)
    for lora in loras:  # each file was read and checked above, before the model loads
        generator.load_lora(lora.file.path, scale=lora.scale, name=lora.name)
    result = generator.generate(
        args.prompt,
        height=request.height,
        width=request.width,
        steps=args.steps,
        seed=args.seed,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        **(inputs.arguments() if inputs is not None else {}),
    )
    written = result.save(output, overwrite=args.overwrite)
    if args.json:
        print_json(args, result_json(result, written))
    else:
        report(result, written)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .checkpoints import make_checkpoint
    from .generator import Generator
    from .result import check_output_path

    output = check_output_path(Path(args.output), overwrite=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zimage-turbo-demo-") as folder:
        checkpoint = make_checkpoint("tiny", Path(folder) / "tiny")
        built = time.perf_counter() - started
        settings = ZImageSettings(model=str(checkpoint), source="local", progress=not args.quiet)
        with Generator(settings=settings) as generator:
            result = generator.generate(DEMO_PROMPT, height=DEMO_SIZE, width=DEMO_SIZE, seed=0)
        written = result.save(output, overwrite=True)  # the demo's image is replaced on every run
    total = time.perf_counter() - started
    print(f"Built the tiny random-weight checkpoint in {built:.1f} s (its images are noise by design).")
    report(result, written)
    print(f"Demo finished in {total:.1f} s.")
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .converted import find_copy, write_copy
    from .sources import resolve_model

    settings = settings_from(args)
    dtype = getattr(torch, args.dtype)
    model = resolve_model(settings)
    existing = None if args.force else find_copy(model, dtype, settings)
    if existing is not None:
        print(f"A sound converted copy exists: {existing.path}")
        return EXIT_OK
    started = time.perf_counter()
    folder = write_copy(model, dtype, settings)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"Wrote the converted copy to {folder} ({size / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def _cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoints import make_checkpoint

    _check_checkpoint_folder(args.directory, overwrite=args.overwrite)
    started = time.perf_counter()
    path = make_checkpoint(
        args.preset,
        args.directory,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        published_layout=args.published_layout,
        controlnet=args.controlnet,
    )
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(
        f"Wrote the {args.preset} checkpoint to {path} ({size / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s"
    )
    return EXIT_OK


def _check_checkpoint_folder(directory: Path, *, overwrite: bool) -> None:
    """Refuse a target folder that make_checkpoint would refuse, as a bad argument (exit 2) and before building."""
    from .checkpoints import read_marker

    target = directory.expanduser()
    if not target.exists():
        return
    if not target.is_dir():
        raise InvalidRequestError(f"{target} exists and is not a folder")
    if not any(target.iterdir()):
        return
    if not overwrite:
        raise InvalidRequestError(f"{target} is not empty; pass --overwrite to replace a checkpoint made earlier")
    if read_marker(target) is None:
        raise InvalidRequestError(f"refusing to overwrite {target}: it holds no checkpoint made by make-checkpoint")


def _cmd_info(args: argparse.Namespace) -> int:

    from .image_metadata import parameters_text, read_metadata

    path = args.image.expanduser()
    if not path.is_file():
        raise InvalidRequestError(f"{str(path)!r} is not a file")
    metadata = read_metadata(path)
    if metadata is None:
        raise InvalidRequestError(f"{str(path)!r} holds no zimage-turbo metadata (only PNGs it saved do)")
    if args.json:
        print_json(args, metadata)
    else:
        print(parameters_text(metadata))
    return EXIT_OK


def _cmd_batch(args: argparse.Namespace) -> int:
    from .batch import read_prompts, run_batch

    width, height = parse_size(args.size)
    settings = settings_from(args)
    # Read and check every line first: a mistake on line 900 must not wait for the model to load.
    items = read_prompts(args.prompts, seed=args.seed, width=width, height=height, steps=args.steps)
    if args.ray is None:
        if args.replicas is not None or args.gpus_per_replica is not None:
            raise InvalidRequestError("--replicas and --gpus-per-replica are for --ray runs; locally use --devices")
        devices = args.devices or "all"
        wanted: str | list[str] = devices if devices == "all" else [d.strip() for d in devices.split(",") if d.strip()]
        report = run_batch(
            items,
            args.out,
            settings=settings,
            devices=wanted,
            overwrite=args.overwrite,
            wait=args.wait,
            loras=args.lora,
        )
    else:
        if args.lora:
            raise InvalidRequestError("--lora is not supported with --ray yet; run the batch locally")
        if args.devices is not None:
            raise InvalidRequestError("--devices is for local runs; with --ray use --replicas and --gpus-per-replica")
        from .ray_batch import run_batch_ray

        report = run_batch_ray(
            items,
            args.out,
            address=None if args.ray == "local" else args.ray,
            settings=settings,
            replicas=args.replicas,
            gpus_per_replica=args.gpus_per_replica,
            cpus_per_replica=args.cpus_per_replica,
            overwrite=args.overwrite,
            wait=args.wait,
        )
    if args.json:
        print_json(args, report.to_dict())
    else:
        print(report.describe())
    return EXIT_OK if not report.failed else EXIT_ERROR
