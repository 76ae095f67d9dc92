"""Strategies that stream weights to the GPU block by block while it computes (diffusers group offloading).

Weights stay in pinned host memory (their homes); diffusers' hooks copy each block to the GPU on a side
CUDA stream just before it runs, prefetching the next block while the current one computes, and drop the
GPU copy afterwards. Peak GPU memory is then a couple of blocks plus activations, and the price is PCIe
bandwidth: the 12.3 GB transformer crosses the bus once per transformer pass. The weights outside the blocks
(embeddings, norms) either stay on the GPU or are copied from their homes when the component is called and
pointed back at them afterwards (see :func:`stream`).

* :class:`Hybrid`: transformer and VAE resident, only the text encoder streamed (8 GB once per prompt).
* :class:`StreamedOffload`: text encoder and transformer streamed by blocks, VAE resident.
* :class:`SequentialOffload`: the same at the level of single layers: the least GPU memory, the most syncs.

A ControlNet, once loaded, goes where the transformer goes: resident under ``hybrid``, streamed by blocks or
layers with it (see :mod:`~zimage_turbo.strategies.control_costs`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, ClassVar, cast

import torch

from ..execution import on_device
from ..flat_quantized import flatten_quantized_linears, flattened_tensors, restore_flattened_linears
from ..hardware import Hardware
from ..profile import ModelProfile, Workload
from ..quantize import QuantizationName
from ..quiet_imports import quiet_imports
from .base import (
    COMPONENTS,
    CONTROLNET,
    QUANTIZED_SHARE,
    LoadStrategy,
    MemoryEstimate,
    Quantizable,
    QuantizableTransformer,
    component_names,
    host_homes,
    on_one_gpu,
    pinned_size,
    place_resident,
    quantized_block_bytes,
    send_everything_home,
)
from .control_costs import (
    controlnet_leaf_bytes,
    controlnet_leaf_pinned,
    controlnet_resident_bytes,
    controlnet_streamed_bytes,
    controlnet_streamed_pinned,
    controlnet_streamed_transfer,
)

__all__ = ["Hybrid", "SequentialOffload", "StreamedOffload"]

# diffusers' hook names (private constants there; stable since group offloading appeared), then ours
# (partial_streaming's pacing): unstream removes them all.
_HOOK_NAMES = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading", "zimage_turbo_pace")
# Cost of each streamed block beyond its transfer (hooks, a stream synchronisation). Measured on the H200
# (benchmarks/results/strategies-issue18-h200-2026-11-28.json): `streamed` denoised 8 passes in 1.945 s where
# the copies alone take 8 x 0.222 s, 0.6 ms more per transformer block; its text encoder, 0.3 ms per block.
BLOCK_OVERHEAD_S = 0.0006
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


def other_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers outside the repeated blocks (embeddings, norms, top-level tensors), once each."""
    seen = {id(tensor) for tensor in block_tensors(module)}
    others: list[torch.Tensor] = []
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            others.append(tensor)
    return others


def _top_group(module: torch.nn.Module) -> Any | None:
    """The group diffusers made of the tensors of ``module`` that no block holds, if any.

    Its GroupOffloadingHook sits on ``module`` itself, with or without streams: with streams diffusers adds a
    LazyPrefetchGroupOffloadingHook beside it, which holds no group (it only traces the block order on the
    first call and then links the top hook's ``next_group`` to the first block).
    """
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(_HOOK_NAMES[0]) if registry is not None else None
    return None if hook is None else hook.group


def _move_through_homes(group: Any, tensors: list[torch.Tensor], homes: Any, device: torch.device) -> None:
    """Make ``group`` copy ``tensors`` from their pinned homes when onloaded and point them home when offloaded.

    diffusers gives this group no stream, so it would copy synchronously from pageable memory and offload by
    copying into new pageable memory each call. Copying on the current stream is safe: it is the compute
    stream, which runs these copies before the layers that read them. Offloading copies nothing back since
    weights never change. The hook calls ``group.onload_()``/``group.offload_()``, so instance attributes win.
    """

    def onload() -> None:
        homes.send_to(tensors, device)

    def offload() -> None:
        homes.send_home(tensors)

    # Kept out of torch.compile's tracing like diffusers' own methods: they re-point tensors at other memory.
    group.onload_ = torch.compiler.disable(onload)  # type: ignore[no-untyped-call]
    group.offload_ = torch.compiler.disable(offload)  # type: ignore[no-untyped-call]


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

    At block level diffusers puts the non-block weights (embeddings, norms) in one group of their own, moved
    when ``module`` is called. With ``keep_other_resident`` they stay on the GPU (their group's offload device
    is the GPU). Otherwise they are homed too and that group moves them through their homes: one asynchronous
    copy from pinned memory per call, and a pointer swap back home afterwards (diffusers would copy from and
    into pageable memory, a fresh host copy per call; for the text encoder a 0.78 GB embedding).
    """
    with quiet_imports():
        from diffusers.hooks import apply_group_offloading

    # diffusers makes its transfer stream on the current CUDA device, which must be the one streamed to
    with on_device(device):
        blocks = level == "block"
        homes.adopt(block_tensors(module) if blocks else module)
        # Homed before the hooks are installed, so that diffusers' first offload finds them on the host already.
        others = other_tensors(module) if blocks and not keep_other_resident else []
        homes.adopt(others)
        use_stream = device.type == "cuda"
        apply_group_offloading(
            module,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level" if blocks else "leaf_level",
            num_blocks_per_group=1 if blocks else None,
            use_stream=use_stream,
            # record_stream has produced garbage outputs in some diffusers releases; synchronising is the default.
            record_stream=record_stream and use_stream,
            low_cpu_mem_usage=False,
        )
        group = _top_group(module)
        if group is None:
            return
        if keep_other_resident and blocks:
            group.offload_device = device
            group.offload_()
        elif keep_other_resident:
            # Layer by layer, the group of the module's own tensors (the transformer's padding tokens) moves with
            # the module's call, and with streams only to the host: kept out of the group, on the GPU, they are
            # there also when a ControlNet reads them outside the transformer's call.
            held = [*group.parameters, *group.buffers]
            group.parameters, group.buffers = [], []
            homes.send_to(held, device)
        elif blocks:
            _move_through_homes(group, others, homes, device)


def unstream(module: torch.nn.Module, homes: Any) -> None:
    """Remove group offloading hooks and send every tensor home (also after an interrupted forward)."""
    for submodule in module.modules():
        # diffusers' groups keep views of our pinned homes (cpu_param_dict) and sit in reference cycles that only
        # a full garbage collection frees: empty them now, or a later switch could pin the weights a second
        # time while the first copy is still held (seen in the H200 soak: +20 GB of host RAM).
        hooks = getattr(submodule, "_diffusers_hook", None)
        hook = hooks.get_hook(_HOOK_NAMES[0]) if hooks is not None else None
        if hook is not None:
            hook.group.cpu_param_dict = {}
            vars(hook.group).pop("onload_", None)
            vars(hook.group).pop("offload_", None)
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        for name in _HOOK_NAMES:
            registry.remove_hook(name, recurse=True)
    homes.send_home(module)


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
        present = component_names(pipe)
        self._place(pipe, [n for n in present if n not in self.streamed], device)
        for name in (n for n in self.streamed if n in present):
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
        present = component_names(pipe)
        for name in (n for n in self.streamed if n in present):
            unstream(getattr(pipe, name), homes)
        keep = self._restore(pipe, [name for name in keep if name not in self.streamed])
        send_everything_home(pipe, keep)
        self.placed_off()

    def _place(self, pipe: Any, names: Collection[str], device: torch.device) -> None:
        place_resident(pipe, names, device)  # Hybrid quantizes its transformer here (QuantizableTransformer)

    def _restore(self, pipe: Any, keep: Collection[str]) -> list[str]:
        return list(keep)

    def resident(self, hardware: Hardware) -> dict[str, torch.device]:
        device = self.target(hardware)
        return {n: device for n in (*COMPONENTS, CONTROLNET) if n not in self.streamed}


class Hybrid(QuantizableTransformer, _StreamingStrategy):
    """Transformer and VAE resident on the GPU; the text encoder streamed block by block per prompt.

    For 13-20 GB cards: about 14 GiB at 1024x1024, and only the 8 GB text encoder crosses the bus per prompt.
    With ``quantize="fp8"`` (or ``"int8"``) the transformer takes about half as much (8-12 GB cards), its bf16
    weights staying in host memory; the image changes a little.
    """

    name: ClassVar[str] = "hybrid"
    streamed: ClassVar[tuple[str, ...]] = ("text_encoder",)
    other_resident: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def __init__(
        self, device: str | torch.device | None = None, record_stream: bool = False, quantize: str | None = None
    ) -> None:
        super().__init__(device, record_stream)
        self._set_quantize(quantize)

    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        gpu = self.gpu_index(hardware)
        te = profile.text_encoder
        base = self._transformer_bytes(profile) + profile.vae.weight_bytes + te.other_bytes
        base += controlnet_resident_bytes(profile)
        weights = {"encode": base + 2 * te.largest_block_bytes, "denoise": base, "decode": base}
        pinned = pinned_size(sum(te.block_bytes), te.largest_block_tensor_bytes) + self._quantized_host_bytes(profile)
        return on_one_gpu(gpu, weights, profile.activation_bytes(work), pinned=pinned)

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        compute = self._compute_seconds(profile, work, steps)
        te = profile.text_encoder
        encode = max(compute["encode"], profile.transfer_seconds(sum(te.block_bytes))) + BLOCK_OVERHEAD_S * len(
            te.block_bytes
        )
        return encode + compute["denoise"] + compute["encode_image"] + compute["decode"]


class StreamedOffload(Quantizable, _StreamingStrategy):
    """Text encoder and transformer streamed block by block, VAE resident: about 3 GiB of GPU memory.

    The transformer crosses the bus once per pass, so this is bandwidth-bound on fast GPUs. With
    ``quantize="fp8"`` (or ``"int8"``) the blocks' large linear layers are quantized once, on the GPU, one layer at
    a time, and streamed from pinned homes of their own (:mod:`~zimage_turbo.flat_quantized`): half the bytes
    per pass. The bf16 weights keep their homes, for a switch back.
    """

    name: ClassVar[str] = "streamed"
    streamed: ClassVar[tuple[str, ...]] = ("text_encoder", "transformer", CONTROLNET)
    # the transformer's embedders and final layer (50 MB) would otherwise cross the bus twice per pass; the
    # ControlNet's patch embedder likewise
    other_resident: ClassVar[tuple[str, ...]] = ("transformer", CONTROLNET)

    def __init__(
        self, device: str | torch.device | None = None, record_stream: bool = False, quantize: str | None = None
    ) -> None:
        super().__init__(device, record_stream)
        self._set_quantize(quantize)
        self._flattened: dict[str, torch.nn.Module] = {}  # the bf16 layers that flattened ones replace

    def apply(self, pipe: Any, hardware: Hardware) -> None:
        if self._quantize is not None:
            # before the hooks go in, so that the hooks' groups see the flattened layers' inner tensors
            kind = cast(QuantizationName, self._quantize)
            homes = host_homes(pipe)
            self._flattened = flatten_quantized_linears(pipe.transformer, kind, self.target(hardware), homes)
        super().apply(pipe, hardware)

    def remove(self, pipe: Any, keep: Collection[str] = ()) -> None:
        super().remove(pipe, keep)
        if self._flattened:
            host_homes(pipe).release(flattened_tensors(pipe.transformer))  # their pinned buffers are freed
            restore_flattened_linears(pipe.transformer, self._flattened)
            self._flattened = {}

    def _block_bytes(self, profile: ModelProfile) -> list[int]:
        """Bytes of each transformer block as streamed."""
        return [quantized_block_bytes(profile, self._quantize, size) for size in profile.transformer.block_bytes]

    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        gpu = self.gpu_index(hardware)
        te, tr = profile.text_encoder, profile.transformer
        base = profile.vae.weight_bytes + tr.other_bytes
        largest = max(self._block_bytes(profile))
        weights = {
            "encode": base + te.other_bytes + 2 * te.largest_block_bytes,
            "denoise": base + 2 * largest,
            "decode": base,
        }
        for phase, nbytes in controlnet_streamed_bytes(profile, work, largest_other_block=largest).items():
            weights[phase] = weights.get(phase, weights["decode"]) + nbytes
        pinned = pinned_size(sum(te.block_bytes), te.largest_block_tensor_bytes) + pinned_size(
            sum(tr.block_bytes), tr.largest_tensor_bytes
        )
        pinned += controlnet_streamed_pinned(profile)
        # the text encoder's non-block weights stay in their pinned homes too (see stream())
        pinned += te.other_bytes
        if self._quantize is not None:  # the quantized layers' own homes, beside the bf16 ones
            quantized = int(sum(tr.block_bytes) * QUANTIZED_SHARE / profile.dtype_bytes)
            pinned += pinned_size(quantized, tr.largest_tensor_bytes // profile.dtype_bytes)
        return on_one_gpu(gpu, weights, profile.activation_bytes(work), pinned=pinned)

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        compute = self._compute_seconds(profile, work, steps)
        te, tr = profile.text_encoder, profile.transformer
        moved = sum(self._block_bytes(profile)) + controlnet_streamed_transfer(profile, work)
        per_pass = max(compute["denoise"] / steps, profile.transfer_seconds(moved))
        per_pass += BLOCK_OVERHEAD_S * len(tr.block_bytes)
        if work.control and profile.controlnet is not None:
            per_pass += BLOCK_OVERHEAD_S * len(profile.controlnet.block_bytes)
        encode = max(compute["encode"], profile.transfer_seconds(sum(te.block_bytes)))
        encode += BLOCK_OVERHEAD_S * len(te.block_bytes)
        encode += profile.transfer_seconds(te.other_bytes)  # once per call, from their pinned homes
        return encode + steps * per_pass + compute["encode_image"] + compute["decode"]


class SequentialOffload(_StreamingStrategy):
    """Text encoder and transformer streamed one layer at a time: the least GPU memory, the last resort."""

    name: ClassVar[str] = "sequential_offload"
    streamed: ClassVar[tuple[str, ...]] = ("text_encoder", "transformer", CONTROLNET)
    level: ClassVar[str] = "leaf"
    # the transformer's own two padding tokens, which a ControlNet reads outside the transformer's call
    other_resident: ClassVar[tuple[str, ...]] = ("transformer",)

    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        gpu = self.gpu_index(hardware)
        vae = profile.vae.weight_bytes
        weights = {
            "encode": vae + 2 * profile.text_encoder.largest_tensor_bytes,
            "denoise": vae + 2 * profile.transformer.largest_tensor_bytes,
            "decode": vae,
        }
        weights["denoise"] += controlnet_leaf_bytes(profile, work).get("denoise", 0)
        pinned = sum(
            pinned_size(c.weight_bytes, c.largest_tensor_bytes) for c in (profile.text_encoder, profile.transformer)
        )
        pinned += controlnet_leaf_pinned(profile)
        return on_one_gpu(gpu, weights, profile.activation_bytes(work), pinned=pinned)

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        compute = profile.compute_seconds(work, steps)
        moved = profile.transformer.weight_bytes + controlnet_streamed_transfer(profile, work)
        per_pass = max(compute["denoise"] / steps, profile.transfer_seconds(moved))
        encode = max(compute["encode"], profile.transfer_seconds(profile.text_encoder.weight_bytes))
        return LEAF_OVERHEAD * (encode + steps * per_pass) + compute["encode_image"] + compute["decode"]
