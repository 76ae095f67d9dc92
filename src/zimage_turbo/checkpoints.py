"""Random-weight Z-Image checkpoints with the real architecture, for tests, demos and benchmarks.

The real weights (about 33 GB) cannot be downloaded everywhere, and tests must not need them. These
checkpoints use the very classes the real one names (``ZImageTransformer2DModel``, ``Qwen3Model``,
``AutoencoderKL``, ``FlowMatchEulerDiscreteScheduler``, ``Qwen2Tokenizer``) and the diffusers folder
layout, so everything that loads, places and runs the real model runs on them unchanged.

``tiny``: toy sizes; builds in about a second on a CPU, under 5 MB; a whole pipeline call takes a
fraction of a second. ``full``: the real sizes (transformer 6.15 B, Qwen3 text encoder 4.02 B, VAE
84 M parameters), bf16, about 20.7 GB; build it on a GPU.

With ``controlnet=True`` the checkpoint also holds a ``ZImageControlNetModel`` that fits its transformer, in a
``controlnet`` folder in diffusers' layout (``config.json`` and ``diffusion_pytorch_model.safetensors``): for
``full`` the architecture of the published Z-Image-Turbo-Fun-Controlnet-Union-2.1 (3.3 B parameters, 6.7 GB in
bf16). The ``controlnet`` setting takes the checkpoint's folder (or that subfolder). Its projections, which a
new ControlNet starts with at zero, get random values too, so that the ControlNet changes the image.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .errors import CheckpointError
from .model import PRESETS, CheckpointPreset, PresetName
from .process_state import default_dtype
from .quiet_imports import quiet_imports
from .toy_tokenizer import build_toy_tokenizer

__all__ = [
    "CONTROLNET_FOLDER",
    "MARKER_FILE",
    "PRESETS",
    "CheckpointPreset",
    "PresetName",
    "make_checkpoint",
    "read_marker",
]

logger = logging.getLogger(__name__)

MARKER_FILE = "zimage_turbo_checkpoint.json"
#: the folder of a checkpoint (or of any model folder) that holds its ControlNet
CONTROLNET_FOLDER = "controlnet"


def make_checkpoint(
    preset: PresetName,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    device: str | None = None,
    overwrite: bool = False,
    published_layout: bool = False,
    controlnet: bool = False,
) -> Path:
    """Build a random-weight Z-Image-Turbo checkpoint in ``path`` and return the folder.

    Args:
        preset: ``"tiny"`` (toy sizes, CPU, seconds) or ``"full"`` (real sizes, bf16, ~20.7 GB).
        path: the folder to create. It must not exist or be empty, unless ``overwrite`` and it holds a
            checkpoint made by this function.
        seed: weights are a deterministic function of the preset, the seed and the device.
        device: where to build. ``tiny`` always builds on the CPU; ``full`` defaults to ``"cuda"`` when
            available (under a minute), else the CPU (slow, and needs ~25 GB of RAM).
        overwrite: replace an existing checkpoint made by this function.
        published_layout: store the transformer as the published checkpoint does: in float32, in shards with
            an index (the cold-start benchmark reads what a first load of the real weights reads).
        controlnet: also build a random ControlNet for the transformer, in the folder ``controlnet``.

    The checkpoint is built in a temporary folder beside ``path`` and renamed into place at the end, so
    an interrupted build never leaves a half-written checkpoint behind.

    Examples:
        >>> folder = make_checkpoint("tiny", "checkpoints/tiny")
        >>> sorted(path.name for path in folder.iterdir())  # the layout diffusers writes, and our marker
        ['model_index.json', 'scheduler', 'text_encoder', 'tokenizer', 'transformer', 'vae',
         'zimage_turbo_checkpoint.json']
        >>> from zimage_turbo import Generator
        >>> Generator(folder).generate("a cat", width=256, height=256, steps=2, seed=0).image.size
        (256, 256)
    """
    if not isinstance(preset, str) or preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    _check_seed(seed)
    spec = PRESETS[preset]
    try:
        target = Path(path).expanduser()
    except TypeError:
        raise CheckpointError(f"path must be a folder path, got {type(path).__name__}") from None
    # the tiny preset is always built on the CPU (seconds), but a device given is still checked
    chosen = _build_device(device) if preset != "tiny" or device is not None else None
    build_device = torch.device("cpu") if preset == "tiny" else chosen
    assert build_device is not None
    _check_target(target, overwrite)
    staging = target.parent / f".{target.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the %s checkpoint on %s in %s", preset, build_device, target)
    try:
        pipeline = _build_pipeline(spec, seed, build_device)
        if controlnet:
            _build_controlnet(spec, seed, build_device).save_pretrained(staging / CONTROLNET_FOLDER)
        if published_layout:
            pipeline.transformer.to(torch.float32)
        pipeline.save_pretrained(staging, safe_serialization=True, max_shard_size=spec.max_shard_size)
        if published_layout:
            shutil.rmtree(staging / "transformer")
            shard = PUBLISHED_SHARD_SIZE[preset]
            pipeline.transformer.save_pretrained(staging / "transformer", safe_serialization=True, max_shard_size=shard)
        del pipeline
        marker = {"preset": preset, "seed": seed, "random_weights": True, "zimage_turbo": __version__}
        if published_layout:
            marker["published_layout"] = True
        if controlnet:
            marker["controlnet"] = True
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if build_device.type == "cuda":
            torch.cuda.empty_cache()
    return target


# The published transformer is three float32 shards of up to 10 GB; the tiny one is split too, so that the
# shards are exercised.
PUBLISHED_SHARD_SIZE = {"tiny": "200KB", "full": "10GB"}


def read_marker(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker that ``make_checkpoint`` leaves in a checkpoint, or None for other folders."""
    marker = Path(path) / MARKER_FILE
    if not marker.is_file():
        return None
    data = json.loads(marker.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**64:
        raise CheckpointError(f"seed must be an integer between 0 and 2**64 - 1 (torch's range), got {seed!r}")


def _build_device(name: str | None) -> torch.device:
    """The device to build on, refused up front if it does not exist here."""
    try:
        device = torch.device(name or _default_build_device())
    except (RuntimeError, TypeError):
        raise CheckpointError(
            f"device must name a torch device such as 'cuda', 'cuda:1' or 'cpu', got {name!r}"
        ) from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise CheckpointError(f"cannot build on {device}: {torch.cuda.device_count()} CUDA GPU(s) visible")
    if device.type not in ("cpu", "cuda"):
        raise CheckpointError(f"building on {device.type} is not supported; use 'cuda' or 'cpu'")
    return device


def _default_build_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    logger.warning("no CUDA GPU: building the full checkpoint on the CPU takes minutes and ~25 GB of RAM")
    return "cpu"


def _check_target(target: Path, overwrite: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a folder")
    if not any(target.iterdir()):
        target.rmdir()
        return
    if not overwrite:
        raise CheckpointError(f"{target} is not empty; pass overwrite=True (CLI: --overwrite) to replace it")
    if read_marker(target) is None:
        # Never delete a folder we did not create, whatever the caller asked.
        raise CheckpointError(f"refusing to overwrite {target}: it does not hold a checkpoint made by make_checkpoint")


def _build_pipeline(spec: CheckpointPreset, seed: int, device: torch.device) -> Any:
    with quiet_imports():
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            ZImagePipeline,
            ZImageTransformer2DModel,
        )
        from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_toy_tokenizer()
    text_config = {"vocab_size": len(tokenizer), **spec.text_encoder}
    # Seeded inside a fork of the random state of the build device only: the caller's random numbers are not
    # ours to reset (torch.manual_seed would also queue a reseed of every GPU).
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), default_dtype(spec.dtype), device:
        if device.type == "cuda":
            index = torch.cuda.current_device() if device.index is None else device.index
            torch.cuda.default_generators[index].manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        # Building directly on the target device in the target dtype: the full preset never exists in
        # float32 or on the CPU, which keeps its build under a minute on a GPU.
        text_encoder = Qwen3Model(Qwen3Config(**text_config))
        transformer = ZImageTransformer2DModel(**spec.transformer)
        vae = AutoencoderKL(**spec.vae)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**spec.scheduler),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _build_controlnet(spec: CheckpointPreset, seed: int, device: torch.device) -> Any:
    """A ``ZImageControlNetModel`` of the preset's architecture with random weights, its zero-initialised
    projections included (seeded apart from the pipeline, so that the pipeline's weights do not depend on it)."""
    with quiet_imports():
        from diffusers import ZImageControlNetModel

    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), default_dtype(spec.dtype), device:
        if device.type == "cuda":
            index = torch.cuda.current_device() if device.index is None else device.index
            torch.cuda.default_generators[index].manual_seed((seed + 1) % 2**64)
        else:
            torch.default_generator.manual_seed((seed + 1) % 2**64)
        model = ZImageControlNetModel(**spec.controlnet)
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in ("before_proj", "after_proj") and isinstance(module, torch.nn.Linear):
                module.reset_parameters()  # a Linear layer's own random initialisation, instead of zeros
    return model
