"""Strategies that stream weights to the GPU block by block while it computes (diffusers group offloading).

Weights stay in pinned host memory (their homes); diffusers' hooks copy each block to the GPU on a side
CUDA stream just before it runs, prefetching the next block while the current one computes, and drop the
GPU copy afterwards. Peak GPU memory is then a couple of blocks plus activations, and the price is PCIe
bandwidth: the 12.3 GB transformer crosses the bus once per transformer pass.

* :class:`Hybrid`: transformer and VAE resident, only the text encoder streamed (8 GB once per prompt).
* :class:`StreamedOffload`: text encoder and transformer streamed by blocks, VAE resident.
* :class:`SequentialOffload`: the same at the level of single layers: the least GPU memory, the most syncs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..hardware import Hardware
from ..profile import ComponentProfile, ModelProfile, Workload
from .base import (
    LoadStrategy,
    MemoryEstimate,
    host_homes,
    peaks_over_phases,
    pinned_size,
    send_everything_home,
)

__all__ = ["Hybrid", "SequentialOffload", "StreamedOffload"]

# diffusers' hook names (private constants there; stable since group offloading appeared).
_HOOK_NAMES = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")
# Pageable (unpinned) copies run at a fraction of the pinned bandwidth.
PAGEABLE_SLOWDOWN = 4.0
# Leaf-level streaming synchronises per layer: measured overhead on top of the transfer time.
LEAF_OVERHEAD = 1.5


def block_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors of the repeated blocks (children that are ModuleList/Sequential), as diffusers groups them."""
    tensors: list[torch.Tensor] = []
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            tensors.extend(child.parameters())
            tensors.extend(child.buffers())
    return tensors


def stream(module: torch.nn.Module, homes: Any, device: torch.device, *, level: str) -> None:
    """Install diffusers group offloading on ``module``, its streamed tensors homed in pinned memory.

    At block level the non-block weights (embeddings, norms) are moved by diffusers itself, synchronously, on
    every call; they keep no pinned home, so that the host holds one copy of them, not two.
    """
    from diffusers.hooks import apply_group_offloading

    homes.adopt(block_tensors(module) if level == "block" else module)
    use_stream = device.type == "cuda"
    apply_group_offloading(
        module,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level" if level == "block" else "leaf_level",
        num_blocks_per_group=1 if level == "block" else None,
        use_stream=use_stream,
        # record_stream has produced garbage outputs in some diffusers releases; synchronising is safe.
        record_stream=False,
        low_cpu_mem_usage=False,
    )


def unstream(module: torch.nn.Module, homes: Any) -> None:
    """Remove group offloading hooks and send every tensor home (also after an interrupted forward)."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        for name in _HOOK_NAMES:
            registry.remove_hook(name, recurse=True)
    homes.send_home(module)


def _resident(pipe: Any, names: tuple[str, ...], device: torch.device) -> None:
    homes = host_homes(pipe)
    for name in names:
        module = getattr(pipe, name)
        homes.send_to(module, device)
        homes.release(module)


class _StreamingStrategy(LoadStrategy):
    """Shared apply/remove: some components streamed at some level, the others resident on the GPU."""

    streamed: ClassVar[tuple[str, ...]]
    level: ClassVar[str] = "block"

    def apply(self, pipe: Any, hardware: Hardware) -> None:
        device = self.target(hardware)
        homes = host_homes(pipe)
        resident = tuple(n for n in ("text_encoder", "transformer", "vae") if n not in self.streamed)
        _resident(pipe, resident, device)
        for name in self.streamed:
            stream(getattr(pipe, name), homes, device, level=self.level)

    def remove(self, pipe: Any) -> None:
        homes = host_homes(pipe)
        for name in self.streamed:
            unstream(getattr(pipe, name), homes)
        send_everything_home(pipe)


def _streamed_phase_bytes(component: ComponentProfile) -> int:
    """GPU bytes of a block-streamed component during its forward: its non-block weights and two blocks
    (the one computing and the one being prefetched)."""
    return component.other_bytes + 2 * component.largest_block_bytes


def _streamed_host_bytes(component: ComponentProfile) -> int:
    return pinned_size(sum(component.block_bytes), component.largest_tensor_bytes) + component.other_bytes


class Hybrid(_StreamingStrategy):
    """Transformer and VAE resident on the GPU; the text encoder streamed block by block per prompt.

    For 13-20 GB cards: about 14 GiB at 1024x1024, and only the 8 GB text encoder crosses the bus per prompt.
    """

    name: ClassVar[str] = "hybrid"
    streamed: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        gpu = self.gpu_index(hardware)
        base = profile.transformer.weight_bytes + profile.vae.weight_bytes
        acts = profile.activation_bytes(work)
        estimate = peaks_over_phases(
            {
                "encode": {gpu: base + _streamed_phase_bytes(profile.text_encoder)},
                "denoise": {gpu: base},
                "decode": {gpu: base},
            },
            {phase: {gpu: value} for phase, value in acts.items()},
        )
        host = _streamed_host_bytes(profile.text_encoder)
        return MemoryEstimate(estimate.gpu_peak, host, host - profile.text_encoder.other_bytes, estimate.by_phase)

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        compute = profile.compute_seconds(work, steps)
        return _streamed_encode_seconds(profile, compute["encode"]) + compute["denoise"] + compute["decode"]


class StreamedOffload(_StreamingStrategy):
    """Text encoder and transformer streamed block by block, VAE resident: about 3 GiB of GPU memory.

    The transformer crosses the bus once per pass, so this is bandwidth-bound on fast GPUs.
    """

    name: ClassVar[str] = "streamed"
    streamed: ClassVar[tuple[str, ...]] = ("text_encoder", "transformer")

    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        gpu = self.gpu_index(hardware)
        vae = profile.vae.weight_bytes
        acts = profile.activation_bytes(work)
        estimate = peaks_over_phases(
            {
                "encode": {gpu: vae + _streamed_phase_bytes(profile.text_encoder)},
                "denoise": {gpu: vae + _streamed_phase_bytes(profile.transformer)},
                "decode": {gpu: vae},
            },
            {phase: {gpu: value} for phase, value in acts.items()},
        )
        host = _streamed_host_bytes(profile.text_encoder) + _streamed_host_bytes(profile.transformer)
        pinned = host - profile.text_encoder.other_bytes - profile.transformer.other_bytes
        return MemoryEstimate(estimate.gpu_peak, host, pinned, estimate.by_phase)

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        compute = profile.compute_seconds(work, steps)
        per_pass = compute["denoise"] / steps
        streamed = max(per_pass, profile.transfer_seconds(sum(profile.transformer.block_bytes)))
        other = 2 * PAGEABLE_SLOWDOWN * profile.transfer_seconds(profile.transformer.other_bytes)
        return _streamed_encode_seconds(profile, compute["encode"]) + steps * (streamed + other) + compute["decode"]


class SequentialOffload(_StreamingStrategy):
    """Text encoder and transformer streamed one layer at a time: the least GPU memory, the last resort."""

    name: ClassVar[str] = "sequential_offload"
    streamed: ClassVar[tuple[str, ...]] = ("text_encoder", "transformer")
    level: ClassVar[str] = "leaf"

    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        gpu = self.gpu_index(hardware)
        vae = profile.vae.weight_bytes
        acts = profile.activation_bytes(work)
        estimate = peaks_over_phases(
            {
                "encode": {gpu: vae + 2 * profile.text_encoder.largest_tensor_bytes},
                "denoise": {gpu: vae + 2 * profile.transformer.largest_tensor_bytes},
                "decode": {gpu: vae},
            },
            {phase: {gpu: value} for phase, value in acts.items()},
        )
        pinned = sum(
            pinned_size(c.weight_bytes, c.largest_tensor_bytes) for c in (profile.text_encoder, profile.transformer)
        )
        return MemoryEstimate(estimate.gpu_peak, pinned, pinned, estimate.by_phase)

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        compute = profile.compute_seconds(work, steps)
        per_pass = max(compute["denoise"] / steps, profile.transfer_seconds(profile.transformer.weight_bytes))
        encode = max(compute["encode"], profile.transfer_seconds(profile.text_encoder.weight_bytes))
        return LEAF_OVERHEAD * (encode + steps * per_pass) + compute["decode"]


def _streamed_encode_seconds(profile: ModelProfile, compute: float) -> float:
    """Text encoding with its blocks streamed, plus its non-block weights copied both ways unpinned."""
    blocks = profile.transfer_seconds(sum(profile.text_encoder.block_bytes))
    other = 2 * PAGEABLE_SLOWDOWN * profile.transfer_seconds(profile.text_encoder.other_bytes)
    return max(compute, blocks) + other
