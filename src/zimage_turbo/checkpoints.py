"""Random-weight Z-Image checkpoints with the real architecture, for tests, demos and benchmarks.

The real weights (about 33 GB) cannot be downloaded everywhere, and tests must not need them. These
checkpoints use the very classes the real one names (``ZImageTransformer2DModel``, ``Qwen3Model``,
``AutoencoderKL``, ``FlowMatchEulerDiscreteScheduler``, ``Qwen2Tokenizer``) and the diffusers folder
layout, so everything that loads, places and runs the real model runs on them unchanged.

``tiny``: toy sizes; builds in about a second on a CPU, under 5 MB; a whole pipeline call takes a
fraction of a second. ``full``: the real sizes (transformer 6.15 B, Qwen3 text encoder 4.02 B, VAE
84 M parameters), bf16, about 20.7 GB; build it on a GPU.

    >>> make_checkpoint("tiny", "checkpoints/tiny")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from ._version import __version__
from .errors import CheckpointError
from .process_state import default_dtype
from .toy_tokenizer import build_toy_tokenizer

__all__ = ["MARKER_FILE", "PRESETS", "CheckpointPreset", "PresetName", "make_checkpoint", "read_marker"]

logger = logging.getLogger(__name__)

PresetName = Literal["tiny", "full"]
MARKER_FILE = "zimage_turbo_checkpoint.json"

_FLUX_VAE_BLOCKS = 4  # a Flux-style VAE: 4 levels, 8x downsampling, 16 latent channels


@dataclass(frozen=True)
class CheckpointPreset:
    """Constructor arguments for each component of one checkpoint size."""

    name: str
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    dtype: torch.dtype
    max_shard_size: str | None = None
    scheduler: dict[str, Any] = field(
        # Z-Image-Turbo's scheduler: a fixed shift of 3, no resolution-dependent shifting.
        default_factory=lambda: {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
    )


def _vae(channels: tuple[int, ...], layers_per_block: int, groups: int) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * _FLUX_VAE_BLOCKS,
        "up_block_types": ["UpDecoderBlock2D"] * _FLUX_VAE_BLOCKS,
        "layers_per_block": layers_per_block,
        "norm_num_groups": groups,
        "act_fn": "silu",
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
        "force_upcast": True,
        "sample_size": 1024,
    }


def _transformer(dim: int, layers: int, refiner_layers: int, heads: int, caption_dim: int) -> dict[str, Any]:
    head_dim = dim // heads
    # RoPE axes (frame, height, width) share the head dimension 1 : 1.5 : 1.5, as in the real model (32/48/48).
    frame = head_dim // 4
    side = (head_dim - frame) // 2
    return {
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": 16,
        "dim": dim,
        "n_layers": layers,
        "n_refiner_layers": refiner_layers,
        "n_heads": heads,
        "n_kv_heads": heads,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": caption_dim,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": [frame, side, head_dim - frame - side],
        # Z-Image-Turbo's RoPE table sizes: 1536 caption positions, 512 patch rows and columns.
        "axes_lens": [1536, 512, 512],
    }


def _qwen3(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int, **extra: Any
) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "hidden_act": "silu",
        **extra,
    }


PRESETS: dict[str, CheckpointPreset] = {
    "tiny": CheckpointPreset(
        name="tiny",
        transformer=_transformer(dim=64, layers=2, refiner_layers=1, heads=2, caption_dim=32),
        # vocab_size is the toy tokenizer's; the pipeline reads hidden_states[-2], so at least 2 layers.
        text_encoder=_qwen3(32, 64, layers=2, heads=2, kv_heads=1, head_dim=16, max_position_embeddings=1024),
        vae=_vae((16, 16, 32, 32), layers_per_block=1, groups=8),
        dtype=torch.float32,
    ),
    "full": CheckpointPreset(
        name="full",
        transformer=_transformer(dim=3840, layers=30, refiner_layers=2, heads=30, caption_dim=2560),
        text_encoder=_qwen3(
            2560, 9728, layers=36, heads=32, kv_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960
        ),
        vae=_vae((128, 256, 512, 512), layers_per_block=2, groups=32),
        dtype=torch.bfloat16,
        max_shard_size="5GB",
    ),
}
assert set(PRESETS) == set(get_args(PresetName))


def make_checkpoint(
    preset: PresetName,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    device: str | None = None,
    overwrite: bool = False,
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

    The checkpoint is built in a temporary folder beside ``path`` and renamed into place at the end, so
    an interrupted build never leaves a half-written checkpoint behind.
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
        pipeline.save_pretrained(staging, safe_serialization=True, max_shard_size=spec.max_shard_size)
        del pipeline
        marker = {"preset": preset, "seed": seed, "random_weights": True, "zimage_turbo": __version__}
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
