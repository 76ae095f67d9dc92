"""LoRA files read, checked and put in one shape: per component, per layer, the pair of low-rank factors whose
product is the change to that layer's weight.

The layouts people publish for Z-Image-Turbo are those diffusers' ``ZImageLoraLoaderMixin`` reads: its own
(peft's names, ``transformer.<layer>.lora_A.weight``), kohya's (``lora_unet_<layer>.lora_down.weight`` with an
``.alpha``), ComfyUI's and musubi's (``diffusion_model.<layer>...``) and the dotted variants of some trainers.
diffusers' converter turns them into its own layout with ``alpha / rank`` folded into the factors, so the
change to a weight is simply ``up @ down`` times the user's scale; we use that converter rather than keep a
copy of the rules. Text-encoder layers are read in diffusers' layout (``text_encoder.<layer>.lora_A.weight``);
diffusers itself loads only the transformer's part of a Z-Image LoRA.

Only safetensors are read (a pickle can run code when loaded). Everything is checked here, before any weight
of the model changes: the header against the file size, values finite, factors paired, two-dimensional and
of matching rank. Whether the layers exist in the model is checked by :mod:`zimage_turbo.adapters`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import LoraError, ZImageError, first_line
from .quiet_imports import quiet_imports
from .safetensors_header import read_safetensors_header

__all__ = ["PICKLE_SUFFIXES", "LoraFile", "LoraPair", "parse_lora", "read_lora"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Components a LoRA may change, by the prefix of their keys in diffusers' layout.
COMPONENT_PREFIXES = {"transformer": "transformer.", "text_encoder": "text_encoder."}
_DOWN, _UP, _ALPHA = ".lora_A.weight", ".lora_B.weight", ".alpha"
# Where diffusers keeps an adapter's configuration in a LoRA's safetensors metadata.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True, eq=False)
class LoraPair:
    """The factors of one layer's change: ``down`` is ``(rank, in_features)``, ``up`` ``(out_features, rank)``,
    with ``alpha / rank`` already folded in (the change is ``up @ down`` at scale 1)."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A LoRA as read from ``path``: ``layers[component][layer name]`` is that layer's :class:`LoraPair`."""

    path: str
    layers: Mapping[str, Mapping[str, LoraPair]]

    @property
    def nbytes(self) -> int:
        """Bytes of the factors (what the file adds to host memory while it is loaded)."""
        return sum(
            pair.down.numel() * pair.down.element_size() + pair.up.numel() * pair.up.element_size()
            for layers in self.layers.values()
            for pair in layers.values()
        )

    @property
    def rank(self) -> int:
        """The largest rank of its layers."""
        return max((pair.rank for layers in self.layers.values() for pair in layers.values()), default=0)

    def layer_count(self) -> int:
        return sum(len(layers) for layers in self.layers.values())


def read_lora(path: Path) -> LoraFile:
    """Read and check the LoRA in the safetensors file ``path``.

    Raises :class:`~zimage_turbo.errors.LoraError` naming the file for a pickle or other non-safetensors file,
    a damaged one, or contents :func:`parse_lora` refuses.
    """
    name = str(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise LoraError(
            f"{name}: a pickle file ({suffix}); only .safetensors LoRAs are read, since unpickling can run code. "
            "Convert it once where you trust it (safetensors.torch.save_file) or use the .safetensors release.",
            path=name,
        )
    if suffix != ".safetensors":
        raise LoraError(f"{name}: not a .safetensors file; LoRAs are read from safetensors only", path=name)
    try:
        read_safetensors_header(path)  # a truncated or malformed file is named here, not faulted on while mapped
        from safetensors.torch import load_file

        tensors = load_file(str(path), device="cpu")
        metadata = _adapter_metadata(path)
    except ZImageError as exc:
        raise LoraError(f"{name}: not a readable safetensors file: {first_line(exc)}", path=name) from None
    except Exception as exc:  # the reader's own errors for a file it cannot use
        raise LoraError(f"{name}: could not be read: {type(exc).__name__}: {first_line(exc)}", path=name) from None
    return parse_lora(tensors, name, metadata)


def _adapter_metadata(path: Path) -> dict[str, Any]:
    """The adapter configuration diffusers writes into a LoRA's safetensors metadata (``lora_alpha``, ``r``
    and their per-layer patterns under ``transformer.``), or nothing."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        raw = (handle.metadata() or {}).get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        loaded = json.loads(raw)
    except ValueError:
        raise LoraError(f"{path}: its {ADAPTER_METADATA_KEY} metadata is not JSON", path=str(path)) from None
    return loaded if isinstance(loaded, dict) else {}


def parse_lora(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, Any] | None = None) -> LoraFile:
    """The layers of a LoRA state dict in any layout diffusers reads for Z-Image (see the module's notes).

    Raises :class:`~zimage_turbo.errors.LoraError` naming ``path`` for an empty file, LoKr or DoRA weights
    (not supported), kohya text-encoder keys, non-finite values, unpaired factors, factors that are not
    matrices, or ranks that differ between a layer's two factors.
    """
    if not tensors:
        raise LoraError(f"{path}: holds no tensors", path=path)
    keys = list(tensors)
    for marker, what in ((".lokr_", "a LoKr adapter"), ("dora_scale", "a DoRA adapter"), ("lora_magnitude", "DoRA")):
        if any(marker in key for key in keys):
            raise LoraError(f"{path}: {what} ({marker!r} keys); only plain LoRA (low-rank pairs) is read", path=path)
    if any(key.startswith(("lora_te_", "lora_te1_", "lora_te2_")) for key in keys):
        raise LoraError(
            f"{path}: has text-encoder layers in kohya's layout (lora_te_...), which is not read; text-encoder "
            "layers are read in diffusers' layout (text_encoder.<layer>.lora_A.weight)",
            path=path,
        )
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise LoraError(f"{path}: non-finite values (NaN or infinity) in {', '.join(bad[:3])}", path=path)
    text = {key: value for key, value in tensors.items() if key.startswith(COMPONENT_PREFIXES["text_encoder"])}
    rest = {key: value for key, value in tensors.items() if key not in text}
    layers: dict[str, dict[str, LoraPair]] = {}
    if rest:
        layers["transformer"] = _pairs(_diffusers_layout(rest, path), "transformer.", path, metadata or {})
    if text:
        layers["text_encoder"] = _pairs(text, "text_encoder.", path, metadata or {})
    return LoraFile(path=path, layers=layers)


def _diffusers_layout(tensors: Mapping[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The transformer's keys in diffusers' layout, converted by diffusers from the others."""
    with quiet_imports():
        from diffusers import ZImagePipeline
    try:
        converted = ZImagePipeline.lora_state_dict(dict(tensors))
    except Exception as exc:  # the converter refuses keys it does not know
        raise LoraError(
            f"{path}: not a LoRA for Z-Image in a layout diffusers reads: {type(exc).__name__}: {first_line(exc)}",
            path=path,
        ) from None
    return dict(converted)


def _pairs(
    tensors: Mapping[str, torch.Tensor], prefix: str, path: str, metadata: Mapping[str, Any]
) -> dict[str, LoraPair]:
    """Group ``<prefix><layer>.lora_A/B.weight`` (and an optional ``.alpha``, folded in) by layer; the
    configuration in ``metadata`` for this component scales each layer as peft would."""
    config = {key.removeprefix(prefix): value for key, value in metadata.items() if key.startswith(prefix)}
    if config.get("use_dora"):
        raise LoraError(f"{path}: a DoRA adapter (use_dora in its metadata); only plain LoRA is supported", path=path)
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, value in tensors.items():
        name = key.removeprefix(prefix)
        if name.endswith(_DOWN):
            downs[name.removesuffix(_DOWN)] = value
        elif name.endswith(_UP):
            ups[name.removesuffix(_UP)] = value
        elif name.endswith(_ALPHA) and value.numel() == 1:
            alphas[name.removesuffix(_ALPHA)] = float(value.item())
        else:
            unknown.append(key)
    if unknown:
        raise LoraError(
            f"{path}: entries that are not LoRA factors: {', '.join(sorted(unknown)[:3])}"
            f"{' ...' if len(unknown) > 3 else ''}",
            path=path,
        )
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired:
        raise LoraError(f"{path}: layers with only one of their two factors: {', '.join(unpaired[:3])}", path=path)
    pairs: dict[str, LoraPair] = {}
    for layer, down in downs.items():
        up = ups[layer]
        if down.dim() != 2 or up.dim() != 2:
            raise LoraError(
                f"{path}: {layer}: factors of shapes {list(down.shape)} and {list(up.shape)}; only linear layers "
                "(two-dimensional factors) are supported",
                path=path,
            )
        if down.shape[0] != up.shape[1]:
            raise LoraError(
                f"{path}: {layer}: the factors' ranks differ (lora_A {list(down.shape)}, lora_B {list(up.shape)})",
                path=path,
            )
        factor = alphas[layer] / down.shape[0] if layer in alphas else _configured_scale(config, layer, path)
        if factor != 1.0:
            down = down * factor
        pairs[layer] = LoraPair(down=down, up=up)
    return pairs


def _configured_scale(config: Mapping[str, Any], layer: str, path: str) -> float:
    """peft's ``lora_alpha / r`` for ``layer`` (``/ sqrt(r)`` with rsLoRA), per-layer patterns first."""
    if "lora_alpha" not in config and "alpha_pattern" not in config:
        return 1.0
    try:
        rank = float(_by_pattern(config.get("rank_pattern") or {}, layer, config.get("r", 1)))
        alpha = float(_by_pattern(config.get("alpha_pattern") or {}, layer, config.get("lora_alpha", rank)))
    except (TypeError, ValueError):
        raise LoraError(f"{path}: its metadata's lora_alpha or r is not a number", path=path) from None
    if not (math.isfinite(alpha) and math.isfinite(rank) and rank > 0):
        raise LoraError(f"{path}: its metadata has lora_alpha={alpha}, r={rank}", path=path)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _by_pattern(patterns: Mapping[str, Any], layer: str, default: Any) -> Any:
    """The value of the first pattern matching the end of ``layer`` (peft's rule), else ``default``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            return value
    return default
