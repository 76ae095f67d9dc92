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
from typing import Any, get_args

from ._version import __version__
from .cli_output import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    MODEL_COMMANDS,
    add_json_option,
    configure_logging,
    print_json,
    report,
    result_json,
)
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
from .request import DEFAULT_STEPS
from .settings import STRATEGY_NAMES, AttentionName, CompileMode, QuantizationSetting, ZImageSettings

__all__ = ["main"]

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


def _common_options(default: Any) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars or info messages")
    common.add_argument("-v", "--verbose", action="store_true", default=default, help="debug messages")
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zimage-turbo",
        description="Run Z-Image-Turbo text-to-image on whatever hardware you have.",
        parents=[_common_options(False)],
    )
    # -q and -v are accepted before the command and after it. After it they must not reset what was given
    # before: argparse would otherwise copy the subcommand's defaults over the main parser's values.
    common = _common_options(argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", parents=[common], help="generate an image from a prompt")
    generate.add_argument("prompt", help="what to draw")
    generate.add_argument("-o", "--output", default="out.png", help="image file to write (default: out.png)")
    generate.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    generate.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    generate.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"transformer passes (default {DEFAULT_STEPS})"
    )
    generate.add_argument(
        "--size", default=None, help="WIDTHxHEIGHT, multiples of 16 (default 1024x1024, or --image's size)"
    )
    generate.add_argument("--guidance", type=float, default=0.0, help="guidance scale (default 0 for Turbo)")
    generate.add_argument("--negative-prompt", default=None, help="used only with --guidance > 0")
    generate.add_argument("--num-images", type=int, default=1, help="images for this prompt (default 1)")
    inputs = generate.add_argument_group("image-to-image, inpainting and ControlNet (docs/tasks.md)")
    inputs.add_argument("--image", default=None, help="start from this picture (image-to-image)")
    inputs.add_argument(
        "--strength",
        type=float,
        default=None,
        help="how much of it is drawn anew, in (0, 1] (default 0.6; 1 with --mask)",
    )
    inputs.add_argument("--mask", default=None, help="inpaint: white pixels of this mask are drawn anew")
    inputs.add_argument("--control", default=None, help="condition on the ControlNet (--controlnet) with this image")
    inputs.add_argument("--control-scale", type=float, default=0.75, help="the ControlNet's weight (default 0.75)")
    add_json_option(generate, "the paths written, seeds, strategy, timings, fallbacks and warnings")
    _add_model_options(generate)
    generate.set_defaults(handler=_cmd_generate)

    demo = commands.add_parser(
        "demo", parents=[common], help="generate with the built-in tiny random-weight model (no download)"
    )
    demo.add_argument("-o", "--output", default="demo.png", help="image file to write (default: demo.png)")
    demo.set_defaults(handler=_cmd_demo)

    make = commands.add_parser(
        "make-checkpoint", parents=[common], help="build a random-weight checkpoint (tiny or full size)"
    )
    make.add_argument("preset", choices=["tiny", "full"])
    make.add_argument("directory", type=Path)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--device", default=None, help="build device for 'full' (default: cuda if available)")
    make.add_argument("--overwrite", action="store_true", help="replace a checkpoint made earlier")
    make.add_argument(
        "--published-layout", action="store_true", help="transformer in float32 shards, as the published weights"
    )
    make.add_argument("--controlnet", action="store_true", help="also a random ControlNet, in DIR/controlnet")
    make.set_defaults(handler=_cmd_make_checkpoint)

    convert = commands.add_parser(
        "convert",
        parents=[common],
        help="write the converted copy of the weights (run dtype, one file per component) for faster loads",
        description="Write the copy of the model's weights in the dtype they run in that later loads read "
        "(docs/configuration.md, converted_copy). An existing sound copy is kept unless --force.",
    )
    convert.add_argument("--model", default=None, help="repo id or local folder (default Tongyi-MAI/Z-Image-Turbo)")
    convert.add_argument("--source", choices=["auto", "huggingface", "modelscope", "local"], default=None)
    convert.add_argument("--cache-dir", type=Path, default=None, help="root of the caches; the copy goes under it")
    convert.add_argument("--offline", action="store_true", default=None, help="use caches only, never download")
    convert.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    convert.add_argument("--force", action="store_true", help="write it again even if a sound copy exists")
    convert.set_defaults(handler=_cmd_convert)

    hardware = commands.add_parser("hardware", parents=[common], help="show the GPUs and memory the library sees")
    add_json_option(hardware, "the GPUs and host memory")
    hardware.set_defaults(handler=cmd_hardware)

    info = commands.add_parser("info", parents=[common], help="show how a saved image was made (its metadata)")
    info.add_argument("image", type=Path, help="a PNG written by zimage-turbo")
    add_json_option(info, "the stored metadata as it is")
    info.set_defaults(handler=_cmd_info)

    # Listed for --help; main() hands "bench ..." to the harness's own parser before this one runs.
    bench = commands.add_parser("bench", help="benchmark against plain diffusers under VRAM budgets (bench --help)")
    bench.set_defaults(handler=_cmd_bench_after_options)

    planning = commands.add_parser(
        "plan",
        parents=[common],
        help="show how a request would be placed, without loading weights",
        description="Rank every strategy for a request on this machine or on hypothetical hardware. Without "
        "--model the real Z-Image-Turbo's sizes are used (nothing is downloaded).",
    )
    planning.add_argument("--model", default=None, help="read sizes from this folder or cached repo instead")
    planning.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT (default 1024x1024)")
    planning.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    planning.add_argument("--num-images", type=int, default=1)
    planning.add_argument("--guidance", type=float, default=0.0)
    planning.add_argument("--vram-gib", type=float, default=None, help="one hypothetical GPU with this much free")
    planning.add_argument("--gpus", default=None, help="hypothetical GPUs, e.g. 2x12 or 24,12 (GiB free each)")
    planning.add_argument("--ram-gib", type=float, default=None, help="hypothetical host RAM available")
    planning.add_argument("--reserve-gib", type=float, default=None, help="GPU memory to keep free (default 0.5)")
    planning.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    planning.add_argument("--h2d-gib-s", type=float, default=None, help="plan with this pinned host-to-GPU GiB/s")
    planning.add_argument("--bf16-tflops", type=float, default=None, help="plan with this bf16 matmul TFLOP/s")
    add_json_option(planning, "the workload, hardware, every candidate and the best one")
    planning.set_defaults(handler=cmd_plan)

    _add_batch_command(commands, common)
    return parser


def _cmd_bench_after_options(args: argparse.Namespace) -> int:
    # Reached only when options came before "bench" (main hands "bench ..." to the harness otherwise).
    raise InvalidRequestError("bench takes only its own options, after the word bench (it has no -q or -v)")


def _add_batch_command(commands: Any, common: argparse.ArgumentParser) -> None:
    batch = commands.add_parser(
        "batch",
        parents=[common],
        help="generate every prompt of a JSONL file into a folder (resumable; optionally on Ray)",
        description='One JSON object per line: {"prompt": ..., "id"?, "seed"?, "width"?, "height"?, "steps"?, '
        '"image"?, "mask"?, "strength"?} (image and mask: paths relative to the file). Writes <id>.png and '
        "manifest.jsonl into --out; rerunning skips what is done. One run per folder at a time. See "
        "docs/scaling.md and docs/tasks.md.",
    )
    batch.add_argument("prompts", type=Path, help="the JSONL prompt file")
    batch.add_argument("-o", "--out", type=Path, required=True, help="output folder (created; rerun to resume)")
    batch.add_argument("--seed", type=int, default=0, help="base seed of lines without a seed (default 0)")
    batch.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT of lines without one (default 1024x1024)")
    batch.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"default {DEFAULT_STEPS}")
    batch.add_argument(
        "--overwrite",
        action="store_true",
        help="make again the images the folder holds for these ids but with another prompt, seed, size or steps",
    )
    batch.add_argument(
        "--wait",
        action="store_true",
        help="if another batch run is using the folder, wait for it to finish (default: stop with an error)",
    )
    batch.add_argument(
        "--devices",
        default=None,
        help="local run: 'all' (a replica per GPU that holds the model) or e.g. cuda:0,cuda:1",
    )
    ray = batch.add_argument_group("Ray (pip install 'zimage-turbo[ray]')")
    ray.add_argument(
        "--ray", metavar="ADDRESS", default=None, help="run on Ray: 'local' starts one here; or a cluster address"
    )
    ray.add_argument("--replicas", type=int, default=None, help="actors (default: one per GPU of the cluster)")
    ray.add_argument("--gpus-per-replica", type=float, default=None, help="default 1 with GPUs, else 0")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="default 1")
    add_json_option(batch, "the batch report")
    _add_model_options(batch)
    batch.set_defaults(handler=_cmd_batch)


def _add_model_options(command: argparse.ArgumentParser) -> None:
    group = command.add_argument_group("model (defaults come from ZIMAGE_* variables and .env)")
    group.add_argument("--model", default=None, help="repo id or local folder (default Tongyi-MAI/Z-Image-Turbo)")
    group.add_argument("--source", choices=["auto", "huggingface", "modelscope", "local"], default=None)
    group.add_argument("--strategy", choices=STRATEGY_NAMES, default=None, help="how to place the model")
    group.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default=None)
    group.add_argument("--cache-dir", type=Path, default=None, help="root of the model caches (like HF_HOME)")
    group.add_argument("--offline", action="store_true", default=None, help="use caches only, never download")
    group.add_argument("--controlnet", default=None, help="the ControlNet for --control: folder, file or repo id")
    group.add_argument(
        "--lora",
        action="append",
        type=parse_lora,
        default=[],
        metavar="FILE_OR_REPO[:SCALE]",
        help="a LoRA to fuse at SCALE (default 1); repeat for several (docs/lora.md)",
    )
    speed = command.add_argument_group("speed (docs/speed.md)")
    speed.add_argument("--attention", choices=get_args(AttentionName), default=None, help="attention kernel")
    speed.add_argument("--compile", choices=get_args(CompileMode), default=None, help="torch.compile the blocks")
    speed.add_argument(
        "--quantization", choices=get_args(QuantizationSetting), default=None, help="fp8/int8 transformer (lossy)"
    )


# the command-line options that are settings of the same name
_SETTINGS_OPTIONS = (
    "model", "source", "strategy", "dtype", "cache_dir", "offline", "controlnet", "attention", "compile",
    "quantization",
)  # fmt: skip


def _settings_from(args: argparse.Namespace, **fixed: Any) -> ZImageSettings:
    """Settings from the environment, overridden by the options given on the command line."""
    given = {name: getattr(args, name) for name in _SETTINGS_OPTIONS if getattr(args, name, None) is not None}
    if args.quiet:
        given["progress"] = False
    return ZImageSettings(**given, **fixed)


def parse_lora(text: str) -> tuple[str, float]:
    """``FILE_OR_REPO[:SCALE]`` -> (source, scale); a colon not followed by a number is part of the source (a
    Windows drive letter)."""
    source, colon, scale = text.rpartition(":")
    if colon and source:
        try:
            return source, float(scale)
        except ValueError:
            pass
    return text, 1.0


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
    settings = _settings_from(args)
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

    settings = _settings_from(args)
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
    settings = _settings_from(args)
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
