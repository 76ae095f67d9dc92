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

from collections.abc import Collection
from typing import Any, ClassVar

import torch

from ..hardware import Hardware
from ..profile import ModelProfile, Workload
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
# Pageable (unpinned) copies run at a fraction of the pinned bandwidth (18.3 against 51.6 GiB/s on the H200,
# before the page faults of a fresh host allocation).
PAGEABLE_SLOWDOWN = 4.0
# Cost of each streamed block beyond its transfer (hooks, a stream synchronisation); measured on the H200.
BLOCK_OVERHEAD_S = 0.002
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


def stream(
    module: torch.nn.Module,
    homes: Any,
    device: torch.device,
    *,
    level: str,
    keep_other_resident: bool = False,
    record_stream: bool = False,
) -> None:
    """Install diffusers group offloading on ``module``, its streamed tensors homed in pinned memory.

    At block level diffusers moves the non-block weights (embeddings, norms) itself, synchronously, on every
    call, and sends them back by copying into new pageable memory (when loaded into homes, their pinned home
    stays beside that copy until the strategy is removed). With ``keep_other_resident`` they stay on the GPU
    instead (their group's offload device is the GPU): for the text encoder that is a 0.78 GB embedding that
    would otherwise cross the bus twice per prompt.
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
        # record_stream has produced garbage outputs in some diffusers releases; synchronising is the default.
        record_stream=record_stream and use_stream,
        low_cpu_mem_usage=False,
    )
    if keep_other_resident:
        registry = getattr(module, "_diffusers_hook", None)
        top = registry.get_hook(_HOOK_NAMES[0]) if registry is not None else None
        if top is not None:
            top.group.offload_device = device
            top.group.offload_()


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
    """Shared apply/remove: some components streamed at some level, the others resident on the GPU.

    Args:
        device: see :class:`LoadStrategy`.
        record_stream: let the allocator track cross-stream use instead of synchronising after each block
            (faster where it works; off by default, as some diffusers releases produced wrong images with it).
    """

    streamed: ClassVar[tuple[str, ...]]
    level: ClassVar[str] = "block"
    #: streamed components whose non-block weights stay on the GPU
    other_resident: ClassVar[tuple[str, ...]] = ()

    def __init__(self, device: str | torch.device | None = None, record_stream: bool = False) -> None:
        super().__init__(device)
        self.record_stream = record_stream

    def apply(self, pipe: Any, hardware: Hardware) -> None:
        device = self.place_on(hardware)
        homes = host_homes(pipe)
        resident = tuple(n for n in ("text_encoder", "transformer", "vae") if n not in self.streamed)
        _resident(pipe, resident, device)
        for name in self.streamed:
            stream(
                getattr(pipe, name),
                homes,
                device,
                level=self.level,
                keep_other_resident=name in self.other_resident,
                record_stream=self.record_stream,
            )

    def remove(self, pipe: Any, keep: Collection[str] = ()) -> None:
        homes = host_homes(pipe)
        for name in self.streamed:
            unstream(getattr(pipe, name), homes)
        send_everything_home(pipe, [name for name in keep if name not in self.streamed])
        self.placed_off()

    def resident(self, hardware: Hardware) -> dict[str, torch.device]:
        device = self.target(hardware)
        return {n: device for n in ("text_encoder", "transformer", "vae") if n not in self.streamed}


class Hybrid(_StreamingStrategy):
    """Transformer and VAE resident on the GPU; the text encoder streamed block by block per prompt.

    For 13-20 GB cards: about 14 GiB at 1024x1024, and only the 8 GB text encoder crosses the bus per prompt.
    """

    name: ClassVar[str] = "hybrid"
    streamed: ClassVar[tuple[str, ...]] = ("text_encoder",)
    other_resident: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        gpu = self.gpu_index(hardware)
        te = profile.text_encoder
        base = profile.transformer.weight_bytes + profile.vae.weight_bytes + te.other_bytes
        acts = profile.activation_bytes(work)
        estimate = peaks_over_phases(
            {
                "encode": {gpu: base + 2 * te.largest_block_bytes},
                "denoise": {gpu: base},
                "decode": {gpu: base},
            },
            {phase: {gpu: value} for phase, value in acts.items()},
        )
        pinned = pinned_size(sum(te.block_bytes), te.largest_block_tensor_bytes)
        return MemoryEstimate(estimate.gpu_peak, pinned, pinned, estimate.by_phase)

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        compute = profile.compute_seconds(work, steps)
        te = profile.text_encoder
        encode = max(compute["encode"], profile.transfer_seconds(sum(te.block_bytes))) + BLOCK_OVERHEAD_S * len(
            te.block_bytes
        )
        return encode + compute["denoise"] + compute["decode"]


class StreamedOffload(_StreamingStrategy):
    """Text encoder and transformer streamed block by block, VAE resident: about 3 GiB of GPU memory.

    The transformer crosses the bus once per pass, so this is bandwidth-bound on fast GPUs.
    """

    name: ClassVar[str] = "streamed"
    streamed: ClassVar[tuple[str, ...]] = ("text_encoder", "transformer")
    # the transformer's embedders and final layer (50 MB) would otherwise cross the bus twice per pass
    other_resident: ClassVar[tuple[str, ...]] = ("transformer",)

    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        gpu = self.gpu_index(hardware)
        te, tr = profile.text_encoder, profile.transformer
        base = profile.vae.weight_bytes + tr.other_bytes
        acts = profile.activation_bytes(work)
        estimate = peaks_over_phases(
            {
                "encode": {gpu: base + te.other_bytes + 2 * te.largest_block_bytes},
                "denoise": {gpu: base + 2 * tr.largest_block_bytes},
                "decode": {gpu: base},
            },
            {phase: {gpu: value} for phase, value in acts.items()},
        )
        pinned = pinned_size(sum(te.block_bytes), te.largest_block_tensor_bytes) + pinned_size(
            sum(tr.block_bytes), tr.largest_tensor_bytes
        )
        return MemoryEstimate(estimate.gpu_peak, pinned + te.other_bytes, pinned, estimate.by_phase)

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        compute = profile.compute_seconds(work, steps)
        te, tr = profile.text_encoder, profile.transformer
        per_pass = max(compute["denoise"] / steps, profile.transfer_seconds(sum(tr.block_bytes)))
        per_pass += BLOCK_OVERHEAD_S * len(tr.block_bytes)
        encode = max(compute["encode"], profile.transfer_seconds(sum(te.block_bytes)))
        encode += BLOCK_OVERHEAD_S * len(te.block_bytes)
        encode += 2 * PAGEABLE_SLOWDOWN * profile.transfer_seconds(te.other_bytes)
        return encode + steps * per_pass + compute["decode"]


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
