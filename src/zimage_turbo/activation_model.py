"""The constants of the planner's memory and time model, measured on one GPU with the full-size checkpoint
(``benchmarks/calibrate.py``): the measurements and their fit are ``calibration.json`` beside this file. How they
enter the model is :mod:`~zimage_turbo.profile`'s description; :meth:`Calibration.on` moves the time constants
to another GPU's measured speeds (:mod:`~zimage_turbo.calibration` measures them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from typing import Any

from .hardware import DeviceSpeeds

__all__ = ["CALIBRATION_BF16_TFLOPS", "VAE_ENCODER_SHARE", "Calibration", "load_calibration"]

# The calibration GPU's bf16 matmul rate, measured as zimage_turbo.calibration measures every GPU (8192x8192
# products, the median of ten): 750-782 TFLOP/s in the probes of benchmarks/results/*h200*.json.
CALIBRATION_BF16_TFLOPS = 770.0
# The VAE encoder's time as a share of the decoder's, until measured (see the module's description).
VAE_ENCODER_SHARE = 0.45


@dataclass(frozen=True)
class Calibration:
    """Activation and speed constants measured on a GPU (see calibration.json for the data behind them)."""

    text_encoder_k: float
    transformer_k: float
    vae_k: float
    vae_tiled_k: float
    # seconds, on the GPU the calibration ran on
    transformer_pass_s_per_tflop: float
    transformer_pass_s_fixed: float
    text_encoder_s: float
    vae_s_per_megapixel: float
    pinned_gib_per_s: float
    vae_tiling_slowdown: float = 2.0
    source: str = "built-in estimate"
    raw: Mapping[str, Any] = field(default_factory=dict)
    bf16_tflops: float = CALIBRATION_BF16_TFLOPS  # the matmul rate of the GPU the seconds are for
    gpu: str = "NVIDIA H200"
    speeds_source: str = "reference"  # where the speeds behind the time constants come from (DeviceSpeeds.source)

    @property
    def speeds(self) -> DeviceSpeeds:
        """The speeds of the GPU these time constants are for (the calibration GPU's until :meth:`on`)."""
        return DeviceSpeeds(self.pinned_gib_per_s, self.bf16_tflops, name=self.gpu, source=self.speeds_source)

    def on(self, speeds: DeviceSpeeds) -> Calibration:
        """These time constants for a GPU with ``speeds``: pinned copies at its bandwidth, every compute time
        scaled by the ratio of the bf16 matmul rates (but the fixed cost of a pass, which is kernel launches).

        An approximation: eagerly, about 40% of a transformer pass is matmul and the rest elementwise work bound
        by memory bandwidth, which GPUs mostly have in proportion. Applying it twice changes nothing more."""
        scale = self.bf16_tflops / speeds.bf16_tflops
        return replace(
            self,
            transformer_pass_s_per_tflop=self.transformer_pass_s_per_tflop * scale,
            text_encoder_s=self.text_encoder_s * scale,
            vae_s_per_megapixel=self.vae_s_per_megapixel * scale,
            pinned_gib_per_s=speeds.h2d_gib_per_s,
            bf16_tflops=speeds.bf16_tflops,
            gpu=speeds.name or "this GPU",
            speeds_source=speeds.source,
        )

    # the VAE encoder's constants; None: estimated from the decoder's (see the module's description)
    vae_encode_k: float | None = None
    vae_encode_s_per_megapixel: float | None = None

    @property
    def encode_k(self) -> float:
        return self.vae_k if self.vae_encode_k is None else self.vae_encode_k

    @property
    def encode_s_per_megapixel(self) -> float:
        if self.vae_encode_s_per_megapixel is not None:
            return self.vae_encode_s_per_megapixel
        return self.vae_s_per_megapixel * VAE_ENCODER_SHARE


@cache
def load_calibration() -> Calibration:
    """The calibration shipped with the package."""
    data = json.loads(resources.files(__package__).joinpath("calibration.json").read_text(encoding="utf-8"))
    fit = data["fit"]
    return Calibration(
        text_encoder_k=fit["text_encoder_k"],
        transformer_k=fit["transformer_k"],
        vae_k=fit["vae_k"],
        vae_tiled_k=fit["vae_tiled_k"],
        transformer_pass_s_per_tflop=fit["transformer_pass_s_per_tflop"],
        transformer_pass_s_fixed=fit["transformer_pass_s_fixed"],
        vae_tiling_slowdown=fit["vae_tiling_slowdown"],
        text_encoder_s=fit["text_encoder_s"],
        vae_s_per_megapixel=fit["vae_s_per_megapixel"],
        pinned_gib_per_s=fit["pinned_gib_per_s"],
        source=data.get("source", "calibration.json"),
        raw=data,
        gpu=data.get("gpu", "NVIDIA H200"),
        vae_encode_k=fit.get("vae_encode_k"),
        vae_encode_s_per_megapixel=fit.get("vae_encode_s_per_megapixel"),
    )
