"""Load a checked model folder into a diffusers ``ZImagePipeline``, weights straight to their device.

Each weighted component is loaded by its own class with ``device_map`` set to the strategy's load
device, so the weights go from the safetensors files to that device without a full copy in host RAM
first, and in the target dtype (the published transformer is stored in float32; it is cast while
loading, never held twice). Only classes from a fixed list are ever instantiated: the class names in
``model_index.json`` select among them and never cause an import, and no remote code is run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .errors import ModelLoadError
from .hardware import Hardware
from .layout import PipelineLayout
from .settings import DtypeName

__all__ = ["load_pipeline", "resolve_dtype"]

logger = logging.getLogger(__name__)


def resolve_dtype(name: DtypeName, device: torch.device, hardware: Hardware) -> torch.dtype:
    """The torch dtype for a setting value. ``"auto"``: bfloat16 where it is native, else float32.

    float16 is never chosen automatically: Z-Image produces NaN (black images) in float16 on GPUs
    without bf16, so those GPUs get float32.
    """
    if name != "auto":
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    if device.type == "cuda":
        index = device.index or 0
        gpu = next((g for g in hardware.gpus if g.index == index), None)
        return torch.bfloat16 if gpu is not None and gpu.bf16 else torch.float32
    if device.type == "mps":
        return torch.bfloat16
    return torch.float32


def load_pipeline(layout: PipelineLayout, *, dtype: torch.dtype, device: torch.device, progress: bool) -> Any:
    """Build a ``ZImagePipeline`` from a complete folder (see :func:`~zimage_turbo.layout.check_pipeline_dir`)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen2Tokenizer, Qwen3ForCausalLM, Qwen3Model

    root = layout.root
    text_encoder_class = Qwen3ForCausalLM if layout.classes["text_encoder"] == "Qwen3ForCausalLM" else Qwen3Model
    # device_map puts weights straight on the device; None loads them to the CPU.
    device_map = None if device.type == "cpu" else str(device)
    common: dict[str, Any] = {"dtype": dtype, "device_map": device_map, "use_safetensors": True}
    try:
        with _progress_bars(progress):
            transformer = ZImageTransformer2DModel.from_pretrained(root / "transformer", **common)
            vae = AutoencoderKL.from_pretrained(root / "vae", **common)
            text_encoder = text_encoder_class.from_pretrained(root / "text_encoder", **common)
            tokenizer = Qwen2Tokenizer.from_pretrained(root / "tokenizer")
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"Loading the model from {root} failed: {exc}") from exc
    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Turn the loading bars of diffusers and transformers off for the duration, if asked."""
    if enabled:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was_diffusers = diffusers_logging.is_progress_bar_enabled()
    was_transformers = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_diffusers:
            diffusers_logging.enable_progress_bar()
        if was_transformers:
            transformers_logging.enable_progress_bar()
