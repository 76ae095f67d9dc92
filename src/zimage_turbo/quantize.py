"""Quantized weights for the transformer's large linear layers (torchao).

fp8 (dynamic, per-row scales; Ada/Hopper and newer) or int8 weight-only (elsewhere), for the attention
projections and feed-forward networks of the transformer's blocks. It changes the image a little; it is
never chosen unless the settings allow it. Resident strategies swap quantized copies into the layers
(:func:`quantize_linears`, :func:`restore_linears`); streaming keeps them as plain tensors
(:mod:`~zimage_turbo.flat_quantized`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Collection, Mapping
from typing import Any, Literal

import torch

from .errors import StrategyUnavailableError
from .quiet_imports import quiet_imports

__all__ = [
    "FP8_ROW_FLOOR",
    "QUANTIZATIONS",
    "QuantizationName",
    "quantization_for",
    "quantization_unavailable",
    "quantize_linears",
    "quantized_linears",
    "quantized_weight",
    "restore_linears",
    "stored_bytes",
]

QuantizationName = Literal["fp8", "int8"]
QUANTIZATIONS: tuple[QuantizationName, ...] = ("fp8", "int8")

# Smallest activation amax that fp8 scaling uses (rows of zeros otherwise get a zero scale).
FP8_ROW_FLOOR = 1e-12
# The linear layers worth quantizing: attention projections and the feed-forward network of every block,
# over 97% of the transformer's weights and nearly all its FLOPs. Embedders, the adaLN modulation and the
# final layer stay in bf16 (small, and the image is most sensitive to them).
_QUANTIZED_SUFFIXES = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                       "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")  # fmt: skip
_BLOCK_LISTS = ("layers.", "noise_refiner.", "context_refiner.")


def quantization_for(device: torch.device) -> QuantizationName:
    """fp8 where the GPU multiplies fp8 natively (compute capability 8.9: Ada, Hopper and newer), else int8
    weight-only."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return "fp8"
    return "int8"


def quantization_unavailable(kind: str, device: torch.device) -> str:
    """Why ``kind`` cannot run on ``device`` ("" when it can)."""
    if kind not in QUANTIZATIONS:
        return f"unknown quantization {kind!r}; known: {', '.join(QUANTIZATIONS)}"
    # What the device cannot do first: installing torchao would not help there.
    if kind == "fp8":
        if device.type != "cuda":
            return "fp8 needs a CUDA GPU"
        if torch.cuda.get_device_capability(device) < (8, 9):
            return "fp8 needs compute capability 8.9 or newer (Ada, Hopper); use int8"
    if importlib.util.find_spec("torchao") is None:
        return "quantization needs torchao: pip install 'zimage-turbo[quant]'"
    return ""


def quantized_linears(
    transformer: torch.nn.Module, blocks: Collection[str] | None = None
) -> dict[str, torch.nn.Linear]:
    """The linear layers that quantization replaces, by module name; with ``blocks`` (block names such as
    ``"layers.3"``), only those inside these blocks."""
    inside = None if blocks is None else tuple(f"{block}." for block in blocks)
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.startswith(_BLOCK_LISTS)
        and name.endswith(_QUANTIZED_SUFFIXES)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
        and (inside is None or name.startswith(inside))
    }


def quantize_linears(
    transformer: torch.nn.Module,
    kind: QuantizationName,
    device: torch.device,
    blocks: Collection[str] | None = None,
) -> dict[str, torch.nn.Parameter]:
    """Give each quantized linear (of ``blocks`` only, when given) a quantized copy of its weight on ``device``,
    one layer at a time (so that a card too small for the bf16 weights can still hold the quantized ones).
    Returns the original weights by module name: they stay where they were (their host homes), and
    :func:`restore_linears` puts them back. All or nothing: after an error (the card is full) every layer has its
    original weight again, so that no quantized copy is left that nothing knows about."""
    originals: dict[str, torch.nn.Parameter] = {}
    try:
        for name, linear in quantized_linears(transformer, blocks).items():
            quantized = quantized_weight(linear.weight, kind, device)
            originals[name] = linear.weight  # type: ignore[assignment]
            linear.weight = quantized
    except BaseException:
        restore_linears(transformer, originals)
        raise
    return originals


def quantized_weight(weight: torch.Tensor, kind: QuantizationName, device: torch.device) -> torch.nn.Parameter:
    """A quantized copy (a torchao tensor subclass) of a linear layer's ``weight``, made on ``device``."""
    reason = quantization_unavailable(kind, device)
    if reason:
        raise StrategyUnavailableError(reason)
    with quiet_imports():
        from torchao.quantization import quantize_

    out_features, in_features = weight.shape
    scratch = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
    scratch.weight = torch.nn.Parameter(weight.detach().to(device), requires_grad=False)
    quantize_(scratch, _quantization_config(kind))
    return scratch.weight


def _quantization_config(kind: QuantizationName) -> Any:
    with quiet_imports():
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow

    # set_inductor_config=False: torchao would otherwise switch on process-wide Inductor tuning (coordinate
    # descent), which changes every later compile in the process (diffusers with it compiled for over 100 s).
    if kind == "fp8":
        # A lower bound on each row's scale: the caption's padding rows are all zero, and torchao divides
        # by their amax (0/0: NaN latents, seen on the H200 with the random-weight checkpoint).
        return Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow(), activation_value_lb=FP8_ROW_FLOOR, set_inductor_config=False
        )
    # version=2: torchao's Int8Tensor, whose inner tensors streaming can hold (flat_quantized). It is the
    # default from torchao 0.18 on; 0.17 still defaults to the deprecated AffineQuantizedTensor (version 1),
    # which streamed strategies cannot flatten, and warns about it.
    return Int8WeightOnlyConfig(version=2, set_inductor_config=False)


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really stores: for a quantized tensor (a torchao subclass), those of its inner tensors."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return tensor.numel() * tensor.element_size()
    names, _ = flatten()
    return sum(stored_bytes(getattr(tensor, name)) for name in names)


def restore_linears(transformer: torch.nn.Module, originals: Mapping[str, torch.nn.Parameter]) -> None:
    """Undo :func:`quantize_linears`: the original weights back in their layers, the quantized copies freed."""
    modules = dict(transformer.named_modules())
    for name, weight in originals.items():
        modules[name].weight = weight
