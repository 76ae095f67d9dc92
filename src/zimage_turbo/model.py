"""Facts about the Z-Image-Turbo architecture that several layers need: the text encoder's token limit, the VAE
tile of our tiling rung, and the constructor arguments of each checkpoint size (``full`` is the real model's;
the planner reads its shapes without the weights, and :func:`~zimage_turbo.checkpoints.make_checkpoint` builds
random checkpoints from both), the ControlNet of each size included.

Kept apart from the modules that use them so that reading a folder, profiling it and building checkpoints do
not import one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

__all__ = [
    "CAPTION_TOKENS",
    "MAX_SEQUENCE_LENGTH",
    "MAX_SIDE",
    "MIN_SIDE",
    "PRESETS",
    "SIDE_MULTIPLE",
    "VAE_TILE_PIXELS",
    "CheckpointPreset",
    "PresetName",
]

#: tokens of a prompt the text encoder sees, chat template included (diffusers' max_sequence_length)
MAX_SEQUENCE_LENGTH = 512
CAPTION_TOKENS = 128  # a typical prompt with the chat template, padded to a multiple of 32 (for the transformer)
VAE_TILE_PIXELS = 512  # tile size (pixels per side) of our VAE tiling rung
# Image sides: the transformer works on 2x2 patches of a latent that is 8x smaller than the image; the range is
# the one requests accept (request.py checks it; input images are sized by it too).
SIDE_MULTIPLE = 16
MIN_SIDE = 256
MAX_SIDE = 2048

PresetName = Literal["tiny", "full"]

_FLUX_VAE_BLOCKS = 4  # a Flux-style VAE: 4 levels, 8x downsampling, 16 latent channels


@dataclass(frozen=True)
class CheckpointPreset:
    """Constructor arguments for each component of one checkpoint size."""

    name: str
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    dtype: torch.dtype
    # ZImageControlNetModel's arguments: a ControlNet that fits this transformer
    controlnet: dict[str, Any] = field(default_factory=dict)
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


def _controlnet(transformer: dict[str, Any], places: list[int]) -> dict[str, Any]:
    """A ControlNet of the Z-Image-Turbo Fun ControlNet Union 2.x kind for ``transformer``: a control block at each
    of the transformer layers ``places``, a control noise refiner beside each of its refiner layers, and a control
    input of 33 channels (16 latent channels of the control image, the mask, 16 of the masked image), so that it
    serves both ControlNet text-to-image and ControlNet inpainting."""
    refiners = int(transformer["n_refiner_layers"])
    return {
        "control_layers_places": places,
        "control_refiner_layers_places": list(range(refiners)),
        "control_in_dim": 2 * int(transformer["in_channels"]) + 1,
        "add_control_noise_refiner": "control_noise_refiner",
        "all_patch_size": transformer["all_patch_size"],
        "all_f_patch_size": transformer["all_f_patch_size"],
        "dim": transformer["dim"],
        "n_refiner_layers": refiners,
        "n_heads": transformer["n_heads"],
        "n_kv_heads": transformer["n_kv_heads"],
        "norm_eps": transformer["norm_eps"],
        "qk_norm": transformer["qk_norm"],
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


_TINY_TRANSFORMER = _transformer(dim=64, layers=2, refiner_layers=1, heads=2, caption_dim=32)
_FULL_TRANSFORMER = _transformer(dim=3840, layers=30, refiner_layers=2, heads=30, caption_dim=2560)

PRESETS: dict[str, CheckpointPreset] = {
    "tiny": CheckpointPreset(
        name="tiny",
        transformer=_TINY_TRANSFORMER,
        # vocab_size is the toy tokenizer's; the pipeline reads hidden_states[-2], so at least 2 layers.
        text_encoder=_qwen3(32, 64, layers=2, heads=2, kv_heads=1, head_dim=16, max_position_embeddings=1024),
        vae=_vae((16, 16, 32, 32), layers_per_block=1, groups=8),
        dtype=torch.float32,
        controlnet=_controlnet(_TINY_TRANSFORMER, places=[0, 1]),
    ),
    "full": CheckpointPreset(
        name="full",
        transformer=_FULL_TRANSFORMER,
        text_encoder=_qwen3(
            2560, 9728, layers=36, heads=32, kv_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960
        ),
        vae=_vae((128, 256, 512, 512), layers_per_block=2, groups=32),
        dtype=torch.bfloat16,
        # the published Z-Image-Turbo-Fun-Controlnet-Union-2.1 (as diffusers' config for it has it): 15 control
        # blocks, at every other layer of the 30
        controlnet=_controlnet(_FULL_TRANSFORMER, places=list(range(0, 30, 2))),
        max_shard_size="5GB",
    ),
}
assert set(PRESETS) == set(get_args(PresetName))
