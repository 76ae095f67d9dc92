"""The parser of the ``zimage-turbo`` command (:mod:`~zimage_turbo.cli`): its commands, their options and help,
and the settings the model options make.

The commands' work stays in :mod:`~zimage_turbo.cli` (and :mod:`~zimage_turbo.cli_plan`): :func:`build_parser`
is given each command's handler, so that this module needs nothing from the modules that run them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, get_args

from ._version import __version__
from .cli_output import add_json_option
from .errors import InvalidRequestError
from .request import DEFAULT_STEPS
from .settings import STRATEGY_NAMES, AttentionName, CompileMode, QuantizationSetting, ZImageSettings

__all__ = ["Handler", "build_parser", "parse_lora", "settings_from"]

# what runs a parsed command; returns the exit status
Handler = Callable[[argparse.Namespace], int]


def _common_options(default: Any) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars or info messages")
    common.add_argument("-v", "--verbose", action="store_true", default=default, help="debug messages")
    return common


def build_parser(handlers: Mapping[str, Handler]) -> argparse.ArgumentParser:
    """The parser of the ``zimage-turbo`` command; a parsed command's ``handler`` is its entry in ``handlers``
    (by command name: ``generate``, ``demo``, ``make-checkpoint``, ``convert``, ``hardware``, ``info``, ``plan``,
    ``batch``)."""
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
    generate.set_defaults(handler=handlers["generate"])

    demo = commands.add_parser(
        "demo", parents=[common], help="generate with the built-in tiny random-weight model (no download)"
    )
    demo.add_argument("-o", "--output", default="demo.png", help="image file to write (default: demo.png)")
    demo.set_defaults(handler=handlers["demo"])

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
    make.set_defaults(handler=handlers["make-checkpoint"])

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
    convert.set_defaults(handler=handlers["convert"])

    hardware = commands.add_parser("hardware", parents=[common], help="show the GPUs and memory the library sees")
    add_json_option(hardware, "the GPUs and host memory")
    hardware.set_defaults(handler=handlers["hardware"])

    info = commands.add_parser("info", parents=[common], help="show how a saved image was made (its metadata)")
    info.add_argument("image", type=Path, help="a PNG written by zimage-turbo")
    add_json_option(info, "the stored metadata as it is")
    info.set_defaults(handler=handlers["info"])

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
    planning.set_defaults(handler=handlers["plan"])

    _add_batch_command(commands, common, handlers["batch"])
    return parser


def _cmd_bench_after_options(args: argparse.Namespace) -> int:
    # Reached only when options came before "bench" (main hands "bench ..." to the harness otherwise).
    raise InvalidRequestError("bench takes only its own options, after the word bench (it has no -q or -v)")


def _add_batch_command(commands: Any, common: argparse.ArgumentParser, handler: Handler) -> None:
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
    batch.set_defaults(handler=handler)


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
    speed.add_argument(
        "--compile",
        choices=get_args(CompileMode),
        default=None,
        help="torch.compile: auto (each part once it pays), on (the blocks now), all (every part now), off",
    )
    speed.add_argument(
        "--quantization", choices=get_args(QuantizationSetting), default=None, help="fp8/int8 transformer (lossy)"
    )


# the command-line options that are settings of the same name
_SETTINGS_OPTIONS = (
    "model", "source", "strategy", "dtype", "cache_dir", "offline", "controlnet", "attention", "compile",
    "quantization",
)  # fmt: skip


def settings_from(args: argparse.Namespace, **fixed: Any) -> ZImageSettings:
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
