"""What a loaded ControlNet costs each kind of placement: GPU bytes per phase, pinned host bytes, seconds per image.

Every strategy places the ControlNet as it places the transformer (see :mod:`zimage_turbo.controlnet`):

* resident (``full_gpu``, ``hybrid``): all its weights on the GPU in every phase;
* streamed by blocks (``streamed``, ``partial``): its patch embedder stays on the GPU, its blocks stream from
  pinned homes while a request that uses it denoises (two at a time: the one computing and the one arriving);
  the transformer's refiner blocks, which it runs too, cross the bus twice per pass where they stream;
* streamed by layers (``sequential_offload``): two of its largest tensors at a time, the rest in pinned homes;
* moved whole (``model_offload``): on the GPU with the transformer while denoising.

A profile without a ControlNet costs nothing here; a request that does not use it costs no transfers.
"""

from __future__ import annotations

from ..profile import ModelProfile, Workload
from .base import pinned_size

__all__ = [
    "controlnet_leaf_bytes",
    "controlnet_leaf_pinned",
    "controlnet_resident_bytes",
    "controlnet_streamed_bytes",
    "controlnet_streamed_pinned",
    "controlnet_streamed_transfer",
]


def controlnet_resident_bytes(profile: ModelProfile) -> int:
    """Bytes of a resident ControlNet (0 without one)."""
    return profile.controlnet.weight_bytes if profile.controlnet is not None else 0


def controlnet_streamed_bytes(profile: ModelProfile, work: Workload, *, largest_other_block: int = 0) -> dict[str, int]:
    """GPU bytes per phase of a ControlNet streamed by blocks: its non-block weights always, and while ``work``
    denoises with it its two blocks in flight, of which the placement's own two transformer blocks
    (``largest_other_block`` each) cover all but one: the ControlNet and the transformer run one after the other,
    but the transformer's first block may arrive while the ControlNet's last ones are still there."""
    controlnet = profile.controlnet
    if controlnet is None:
        return {}
    spent = dict.fromkeys(("encode", "encode_image", "denoise", "decode"), controlnet.other_bytes)
    if work.control:
        spent["denoise"] += max(2 * controlnet.largest_block_bytes - largest_other_block, 0)
    return spent


def controlnet_streamed_pinned(profile: ModelProfile) -> int:
    """Pinned host bytes of a ControlNet streamed by blocks: its blocks' homes (0 without one)."""
    controlnet = profile.controlnet
    if controlnet is None:
        return 0
    return pinned_size(sum(controlnet.block_bytes), controlnet.largest_block_tensor_bytes)


def controlnet_streamed_transfer(profile: ModelProfile, work: Workload, *, refiners_stream: bool = True) -> int:
    """Bytes that cross the bus per pass for the ControlNet of a request that uses it: its blocks, and the
    transformer's refiner blocks once more when they stream (0 otherwise)."""
    controlnet = profile.controlnet
    if controlnet is None or not work.control:
        return 0
    transformer = profile.transformer
    refiners = sum(
        size for name, size in zip(transformer.block_names, transformer.block_bytes, strict=True) if "refiner" in name
    )
    return sum(controlnet.block_bytes) + (refiners if refiners_stream else 0)


def controlnet_leaf_bytes(profile: ModelProfile, work: Workload) -> dict[str, int]:
    """GPU bytes per phase of a ControlNet streamed layer by layer: two of its largest tensors while denoising."""
    controlnet = profile.controlnet
    if controlnet is None or not work.control:
        return {}
    return {"denoise": 2 * controlnet.largest_tensor_bytes}


def controlnet_leaf_pinned(profile: ModelProfile) -> int:
    """Pinned host bytes of a ControlNet streamed layer by layer: all its weights' homes."""
    controlnet = profile.controlnet
    if controlnet is None:
        return 0
    return pinned_size(controlnet.weight_bytes, controlnet.largest_tensor_bytes)
