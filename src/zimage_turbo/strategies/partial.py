"""``partial``: as many blocks resident as fit, the others streamed; for cards between 4 and 16 GB.

The VAE, the transformer's non-block weights and as many transformer blocks as fit stay on the GPU; the other
blocks stream from their pinned homes, each copied while the one before computes
(:mod:`~zimage_turbo.strategies.partial_streaming`). The text encoder is resident, streamed or partly resident
by the same rule in its phase. How many blocks of each is decided from sizes alone
(:mod:`~zimage_turbo.strategies.residency`): the planner sizes it for each request and card, and an instance
with the counts given places exactly those (``PartialOffload(transformer_blocks=20, text_encoder_blocks=0)``).

With ``quantize`` the transformer's large linear layers are quantized as ``hybrid`` and ``streamed`` do it: in
place on the GPU for resident blocks (which can then be compiled), as flat layers with pinned homes of their own
for streamed ones; the bf16 weights keep their homes, for a switch back. When memory runs out anyway,
:meth:`PartialOffload.smaller` offers the same placement with half the resident blocks, which the ladder tries
before any other strategy.

A ControlNet, once loaded, keeps its patch embedder on the GPU and streams its blocks, as ``streamed`` does
(:mod:`~zimage_turbo.strategies.control_costs`); the resident blocks are sized with room for it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, ClassVar, cast

import torch

from ..errors import InvalidSettingsError
from ..flat_quantized import flatten_quantized_linears, flattened_tensors, restore_flattened_linears
from ..hardware import Hardware
from ..host import module_tensors
from ..profile import ComponentProfile, ModelProfile, Workload
from ..quantize import QuantizationName, quantize_linears, quantized_linears, restore_linears
from ..request import DEFAULT_STEPS
from .base import (
    ALLOCATOR_MARGIN,
    CONTROLNET,
    QUANTIZED_SHARE,
    LoadStrategy,
    MemoryEstimate,
    Quantizable,
    component_names,
    components,
    host_homes,
    on_one_gpu,
    pinned_size,
    place_resident,
    send_everything_home,
)
from .control_costs import controlnet_streamed_bytes, controlnet_streamed_pinned, controlnet_streamed_transfer
from .partial_streaming import stream_blocks
from .residency import Residency, partial_seconds, partial_weights, size_residency, streamed_blocks
from .streaming import BLOCK_OVERHEAD_S, stream, unstream

__all__ = ["DEFAULT_LOOKAHEAD", "MAX_LOOKAHEAD", "PartialOffload"]

# Each step of lookahead holds one more streamed block on the GPU (0.34 GiB in bf16) for a deeper overlap; past
# 2 or 3 the bus is busy all the time anyway (see residency's time model).
MAX_LOOKAHEAD = 4
# Measured on the H200 (benchmarks/results/partial-lookahead-h200-2026-11-29.json): 2 was faster than 1 under
# every cap from 4 to 12 GiB (1.59 -> 1.50 s/image at 8 GiB), its peak within the cap and its image the same.
DEFAULT_LOOKAHEAD = 2


class PartialOffload(Quantizable):
    """The VAE and as many transformer and text-encoder blocks as fit resident on one GPU; the rest streamed.

    Args:
        device: see :class:`~zimage_turbo.strategies.LoadStrategy`.
        record_stream: see :class:`~zimage_turbo.strategies.StreamedOffload`.
        quantize: ``"fp8"`` or ``"int8"`` for the transformer's large linear layers (the image changes a little).
        transformer_blocks: how many of the transformer's 34 blocks stay resident; None: as many as pay off on
            the card (the planner decides for each request).
        text_encoder_blocks: the same for the text encoder's 36 blocks (with any, its token embedding stays too).
        lookahead: how many of the transformer's streamed blocks may be on their way while one computes. 1: each
            is copied while the streamed block before it computes, and the host waits for each streamed block's
            compute (diffusers' group offloading as it is). 2 (the default) to 4: copies start as soon as the bus
            is free and the GPU has reached the streamed block ``lookahead`` back, so the bus also works while
            resident blocks compute; it holds ``lookahead + 1`` streamed blocks on the GPU instead of 2 (the
            planner counts them).
    """

    name: ClassVar[str] = "partial"
    # resident blocks carry no hook and stay on one GPU: they can be compiled (the streamed ones run eagerly)
    compilable: ClassVar[bool] = True

    def __init__(
        self,
        device: str | torch.device | None = None,
        record_stream: bool = False,
        quantize: str | None = None,
        transformer_blocks: int | None = None,
        text_encoder_blocks: int | None = None,
        *,
        lookahead: int = DEFAULT_LOOKAHEAD,
    ) -> None:
        super().__init__(device)
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or not 1 <= lookahead <= MAX_LOOKAHEAD:
            raise InvalidSettingsError(
                f"PartialOffload: lookahead must be a whole number from 1 to {MAX_LOOKAHEAD}, got {lookahead!r}"
            )
        self.lookahead = lookahead
        self.record_stream = record_stream
        self.transformer_blocks = _count("transformer_blocks", transformer_blocks)
        self.text_encoder_blocks = _count("text_encoder_blocks", text_encoder_blocks)
        self._set_quantize(quantize)
        self._originals: dict[str, torch.nn.Parameter] = {}  # bf16 weights of resident quantized layers
        self._flattened: dict[str, torch.nn.Module] = {}  # the bf16 layers that streamed flat ones replace

    # -- what it is -------------------------------------------------------------------------------------------

    @property
    def residency(self) -> Residency | None:
        """The resident block counts, once both are decided (see :meth:`sized`)."""
        if self.transformer_blocks is None or self.text_encoder_blocks is None:
            return None
        return Residency(self.transformer_blocks, self.text_encoder_blocks)

    @property
    def label(self) -> str:
        """``partial(20,4)``: 20 transformer blocks and 4 text-encoder blocks resident (``partial`` until sized);
        ``+fp8`` when quantized, ``+lookahead1`` (``3``, ``4``) with another lookahead than the default."""
        counts = "" if self.residency is None else f"({self.transformer_blocks},{self.text_encoder_blocks})"
        ahead = f"+lookahead{self.lookahead}" if self.lookahead != DEFAULT_LOOKAHEAD else ""
        return f"{self.name}{counts}" + (f"+{self.quantize}" if self.quantize else "") + ahead

    def __repr__(self) -> str:
        fields = [f"device={str(self.device)!r}"] if self.device is not None else []
        fields += [f"quantize={self.quantize!r}"] if self.quantize else []
        if self.transformer_blocks is not None:
            fields.append(f"transformer_blocks={self.transformer_blocks}")
        if self.text_encoder_blocks is not None:
            fields.append(f"text_encoder_blocks={self.text_encoder_blocks}")
        if self.lookahead != DEFAULT_LOOKAHEAD:
            fields.append(f"lookahead={self.lookahead}")
        return f"{type(self).__name__}({', '.join(fields)})"

    def with_counts(self, residency: Residency) -> PartialOffload:
        """The same placement (device, quantization, lookahead) with these resident counts."""
        return self._changed(self.quantize, residency.transformer, residency.text_encoder)

    def with_quantize(self, quantize: str | None) -> PartialOffload:
        """The same placement (device, counts, lookahead) with ``quantize``: a new strategy, not placed."""
        return self._changed(quantize, self.transformer_blocks, self.text_encoder_blocks)

    def _changed(self, quantize: str | None, transformer: int | None, text_encoder: int | None) -> PartialOffload:
        # every setting but the ones changed, in one place: a new setting is added here only
        return PartialOffload(
            self.device, self.record_stream, quantize, transformer, text_encoder, lookahead=self.lookahead
        )

    def sized(self, profile: ModelProfile, hardware: Hardware, work: Workload, reserve_bytes: int = 0) -> LoadStrategy:
        """With both counts decided: the fastest predicted that fit ``work`` on the target GPU with
        ``reserve_bytes`` kept free (counts given are kept). Where not even everything streamed fits, none
        resident (whose estimate then says it does not fit). On a CPU or MPS device: everything resident."""
        if self.residency is not None:
            return self
        given = Residency(self.transformer_blocks or 0, self.text_encoder_blocks or 0)
        device = self.target(hardware)
        if device.type != "cuda":  # no card to fill: everything not given stays
            every = Residency(len(profile.transformer.block_bytes), len(profile.text_encoder.block_bytes))
            return self.with_counts(
                Residency(
                    every.transformer if self.transformer_blocks is None else given.transformer,
                    every.text_encoder if self.text_encoder_blocks is None else given.text_encoder,
                )
            )
        free = next((g.free_bytes for g in hardware.gpus if g.index == (device.index or 0)), 0)
        # room for a ControlNet's streamed blocks (as if no transformer block streamed beside them) in every phase
        control = max(controlnet_streamed_bytes(profile, work).values(), default=0)
        found = size_residency(
            profile,
            work,
            self._compute_seconds(profile, work, DEFAULT_STEPS),
            DEFAULT_STEPS,  # the split barely depends on the number of passes: resident blocks pay off at each
            int((free - reserve_bytes) / (1 + ALLOCATOR_MARGIN)) - control,
            quantize=self._quantize,
            transformer=self.transformer_blocks,
            text_encoder=self.text_encoder_blocks,
            lookahead=self.lookahead,
        )
        return self.with_counts(found or given)

    def smaller(self, phase: str) -> LoadStrategy | None:
        """The same placement with half the resident blocks of the component that ran out of memory in
        ``phase`` (the text encoder's while encoding, if it has any; else the transformer's; both while placing),
        or None when nothing is resident any more."""
        residency = self.residency
        if residency is None:
            return None
        n, m = residency.transformer, residency.text_encoder
        if phase == "place":
            n, m = n // 2, m // 2
        elif phase == "encode" and m:
            m //= 2
        elif n:
            n //= 2
        elif m:
            m //= 2
        if (n, m) == (residency.transformer, residency.text_encoder):
            return None
        return self.with_counts(Residency(n, m))

    # -- pure -----------------------------------------------------------------------------------------------

    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        sized = cast(PartialOffload, self.sized(profile, hardware, work))
        assert sized.residency is not None
        residency = sized.residency.clamped(profile)
        weights = partial_weights(profile, residency, self._quantize, self.lookahead)
        for phase, nbytes in controlnet_streamed_bytes(profile, work).items():
            weights[phase] = weights.get(phase, weights["decode"]) + nbytes
        host = self._host_bytes(profile, residency) + controlnet_streamed_pinned(profile)
        return on_one_gpu(self.gpu_index(hardware), weights, profile.activation_bytes(work), pinned=host)

    def _host_bytes(self, profile: ModelProfile, residency: Residency) -> int:
        """Pinned homes: the text encoder's and the transformer's weights, resident or not (they load into
        their homes and keep them, for switches and fallbacks), as for ``streamed``; and the quantized copies
        of the streamed blocks."""
        te, tr = profile.text_encoder, profile.transformer
        host = pinned_size(sum(te.block_bytes), te.largest_block_tensor_bytes) + te.other_bytes
        host += pinned_size(sum(tr.block_bytes), tr.largest_tensor_bytes)
        streamed = [tr.block_bytes[i] for i in streamed_blocks(len(tr.block_bytes), residency.transformer)]
        if self._quantize is not None and streamed:
            quantized = int(sum(streamed) * QUANTIZED_SHARE / profile.dtype_bytes)
            host += pinned_size(quantized, tr.largest_tensor_bytes // profile.dtype_bytes)
        return host

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        """Seconds per image (see :func:`~zimage_turbo.strategies.residency.partial_seconds`); an instance not
        yet sized is predicted with everything streamed."""
        residency = self.residency or Residency(self.transformer_blocks or 0, self.text_encoder_blocks or 0)
        seconds = partial_seconds(
            profile, self._compute_seconds(profile, work, steps), steps, residency, self._quantize, self.lookahead
        )
        if work.control and profile.controlnet is not None:  # its blocks cross the bus at each pass, not overlapped
            moved = controlnet_streamed_transfer(profile, work, refiners_stream=False)
            seconds += steps * (
                profile.transfer_seconds(moved) + BLOCK_OVERHEAD_S * len(profile.controlnet.block_bytes)
            )
        return seconds

    # -- side effects ---------------------------------------------------------------------------------------

    def resident(self, hardware: Hardware) -> dict[str, torch.device]:
        """The VAE: the other components keep their homes even when all their blocks stay on the GPU."""
        return {"vae": self.target(hardware)}

    def execution_device(self, pipe: Any) -> torch.device:
        assert self._placed_on is not None, "execution_device() is known once the strategy is applied"
        return self._placed_on

    def apply(self, pipe: Any, hardware: Hardware) -> None:
        device = self.place_on(hardware)
        # the live pipeline's block names and sizes, in execution order, so that apply and estimate agree
        profile = ModelProfile.from_modules(components(pipe))
        sized = cast(PartialOffload, self.sized(profile, hardware, Workload()))
        assert sized.residency is not None
        residency = sized.residency.clamped(profile)
        homes = host_homes(pipe)
        place_resident(pipe, ["vae"], device)
        self._place_transformer(pipe.transformer, profile.transformer, residency.transformer, homes, device)
        text = pipe.text_encoder
        streamed, _ = _split(text, profile.text_encoder, residency.text_encoder)
        keep_others = residency.text_encoder > 0
        if keep_others:
            homes.send_to(_not_streamed(text, streamed), device)
        stream_blocks(text, streamed, homes, device, others_resident=keep_others, record_stream=self.record_stream)
        if CONTROLNET in component_names(pipe):
            controlnet = getattr(pipe, CONTROLNET)
            stream(controlnet, homes, device, level="block", keep_other_resident=True, record_stream=self.record_stream)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _place_transformer(
        self, transformer: torch.nn.Module, profile: ComponentProfile, count: int, homes: Any, device: torch.device
    ) -> None:
        streamed, resident = _split(transformer, profile, count)
        names = {id(block): name for name, block in transformer.named_modules()}
        streamed_names = [names[id(block)] for block in streamed]
        resident_names = [names[id(block)] for block in resident]
        kind = cast("QuantizationName | None", self._quantize)
        if kind is not None and streamed_names:
            # before the hooks go in, so that their groups hold the flat layers' inner tensors
            self._flattened = flatten_quantized_linears(transformer, kind, device, homes, streamed_names)
        kept: set[int] = set()
        if kind is not None:
            kept = {id(linear.weight) for linear in quantized_linears(transformer, resident_names).values()}
        # everything that is not streamed stays: not only the block lists' other tensors (a Sequential child such
        # as the caption embedder is neither a streamed block nor one of "the others" of streaming.other_tensors)
        staying = _not_streamed(transformer, streamed)
        homes.send_to([t for t in staying if id(t) not in kept], device)
        if kind is not None and resident_names:
            self._originals = quantize_linears(transformer, kind, device, resident_names)
        stream_blocks(
            transformer,
            streamed,
            homes,
            device,
            others_resident=True,
            record_stream=self.record_stream,
            lookahead=self.lookahead,
        )

    def remove(self, pipe: Any, keep: Collection[str] = ()) -> None:
        homes = host_homes(pipe)
        if self._originals:  # first: the quantized copies must not be sent "home" (they have none)
            restore_linears(pipe.transformer, self._originals)
            self._originals = {}
        for name in ("transformer", "text_encoder", CONTROLNET):
            if name in component_names(pipe):
                unstream(getattr(pipe, name), homes)  # hooks gone, every weight of it at home
        send_everything_home(pipe, keep)
        if self._flattened:
            homes.release(flattened_tensors(pipe.transformer))  # their pinned buffers are freed
            restore_flattened_linears(pipe.transformer, self._flattened)
            self._flattened = {}
        self.placed_off()


def _count(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InvalidSettingsError(f"PartialOffload: {name} must be None or a whole number >= 0, got {value!r}")
    return value


def _not_streamed(module: torch.nn.Module, streamed: list[torch.nn.Module]) -> list[torch.Tensor]:
    """Every tensor of ``module`` that no streamed block holds."""
    moving = {id(t) for block in streamed for t in module_tensors(block)}
    return [t for t in module_tensors(module) if id(t) not in moving]


def _split(
    module: torch.nn.Module, profile: ComponentProfile, resident: int
) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """(streamed, resident) blocks of ``module`` in execution order, the streamed ones spread evenly."""
    blocks = [module.get_submodule(name) for name in profile.block_names]
    moving = set(streamed_blocks(len(blocks), resident))
    return [b for i, b in enumerate(blocks) if i in moving], [b for i, b in enumerate(blocks) if i not in moving]
