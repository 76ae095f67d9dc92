"""Several GPUs, no offloading: components (or transformer blocks) spread over the cards.

Whole components go to different cards when they fit (transformer and VAE on the roomiest card, text
encoder on another); otherwise the transformer's blocks are split across cards in order, each card taking a
share in proportion to the memory it has left, and accelerate's ``dispatch_model`` moves activations between
them. The assignment is a pure function of the sizes (:func:`assign`), so the estimate and the placement
always agree.

:class:`MultiGPUHybrid` is the same with the text encoder streamed block by block onto one card per prompt:
for cards that together hold the transformer but not the whole model (two 8 GiB cards).

A ControlNet loaded earlier stays in its host homes: requests that use it are placed on one card instead.

The transformer and the VAE compute on the ``main`` card, the text encoder on its own: the pipeline's
execution device is pinned to ``main`` (diffusers would name the text encoder's card, see
:mod:`zimage_turbo.execution`), and accelerate's hooks move each block's inputs to the block's card.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import StrategyUnavailableError
from ..execution import on_device
from ..hardware import GIB, Hardware
from ..host import module_tensors
from ..profile import ComponentProfile, ModelProfile, Workload
from .base import (
    ALLOCATOR_MARGIN,
    LoadStrategy,
    MemoryEstimate,
    components,
    host_homes,
    pinned_size,
    send_everything_home,
)
from .streaming import BLOCK_OVERHEAD_S, stream, unstream

__all__ = ["Assignment", "MultiGPUDispatch", "MultiGPUHybrid", "assign"]

# Moving activations between cards costs little next to the transformer passes.
CROSS_GPU_OVERHEAD = 1.03


@dataclass(frozen=True)
class Assignment:
    """Which GPU holds what. ``main`` holds the transformer's non-block weights and the VAE (latents live
    there); block lists give the GPU of each block in execution order."""

    main: int
    transformer_blocks: tuple[int, ...]
    text_encoder_main: int
    text_encoder_blocks: tuple[int, ...]
    peaks: dict[int, int] = field(default_factory=dict)
    # True: the text encoder lives in host memory and streams onto ``text_encoder_main`` per prompt
    text_encoder_streamed: bool = False

    @property
    def gpus(self) -> tuple[int, ...]:
        used = {self.main, self.text_encoder_main, *self.transformer_blocks, *self.text_encoder_blocks}
        return tuple(sorted(used))


class _Card:
    def __init__(self, index: int, capacity: int) -> None:
        self.index = index
        self.capacity = capacity
        self.weights = 0
        self.activation = 0  # the largest activation of the phases that run here

    def room(self, activation: int) -> int:
        return self.capacity - self.weights - max(self.activation, activation)

    def take(self, nbytes: int, activation: int) -> bool:
        if nbytes > self.room(activation):
            return False
        self.weights += nbytes
        self.activation = max(self.activation, activation)
        return True


def _spread(cards: list[_Card], component: ComponentProfile, activation: int, first: int) -> tuple[int, ...] | None:
    """Blocks in order onto the cards, filling card ``first`` and then the others in turn (wrapping around:
    execution order does not care which card comes first); None when they do not fit."""
    placed: list[int] = []
    turn = [cards[(first + k) % len(cards)] for k in range(len(cards))]
    position = 0
    for nbytes in component.block_bytes:
        while not turn[position].take(nbytes, activation):
            position += 1
            if position == len(turn):
                return None
        placed.append(turn[position].index)
    return tuple(placed)


def _spread_balanced(
    cards: list[_Card], component: ComponentProfile, activation: int, first: int
) -> tuple[int, ...] | None:
    """Blocks in order over the cards (from card ``first``, wrapping around), each card's share of the bytes in
    proportion to the room it has: every card keeps about the same fraction of its memory free, instead of the
    first ones being filled to the brim. None when the shares, rounded to whole blocks, do not fit."""
    turn = [cards[(first + k) % len(cards)] for k in range(len(cards))]
    rooms = [max(card.room(activation), 0) for card in turn]
    blocks = component.block_bytes
    if sum(blocks) > sum(rooms):
        return None
    owners: list[int] = []
    remaining = sum(blocks)
    for k, room in enumerate(rooms):
        # Each card's target is its part of what is left, so that rounding on one card is made up by the next.
        target = remaining * room / max(sum(rooms[k:]), 1)
        last = k == len(rooms) - 1
        share = 0
        while len(owners) < len(blocks):
            nbytes = blocks[len(owners)]
            if share + nbytes > room or (not last and share + nbytes / 2 > target):
                break
            owners.append(k)
            share += nbytes
        remaining -= share
    if len(owners) < len(blocks):
        return None
    for owner, nbytes in zip(owners, blocks, strict=True):
        taken = turn[owner].take(nbytes, activation)
        assert taken, "a share within its card's room must be taken"
    return tuple(turn[owner].index for owner in owners)


def assign(
    profile: ModelProfile, capacities: dict[int, int], work: Workload, *, stream_text_encoder: bool = False
) -> Assignment | None:
    """Place the model on GPUs with these capacities (bytes each may use), or None when it does not fit.

    Whole components first: the transformer (with the VAE) whole on the roomiest card and the text encoder whole
    on another, when they fit. A component that fits on no card is split into its blocks, each card taking a
    share in proportion to its room. When such a balanced split leaves something without room (it makes every
    card it uses hold a pass's activations), the blocks fill the cards in turn instead, which packs tightest.

    With ``stream_text_encoder`` the text encoder holds no card: one card (another than the main one when it
    can) keeps room for what streaming it needs during the encode (its non-block weights, two blocks in
    flight, the encode's activations) beside its share of the transformer.
    """
    stream = stream_text_encoder
    return _assign(profile, capacities, work, balanced=True, stream_text_encoder=stream) or _assign(
        profile, capacities, work, balanced=False, stream_text_encoder=stream
    )


def _assign(
    profile: ModelProfile, capacities: dict[int, int], work: Workload, *, balanced: bool, stream_text_encoder: bool
) -> Assignment | None:
    acts = profile.activation_bytes(work)
    order = sorted(capacities, key=lambda index: -capacities[index])
    cards = [_Card(index, capacities[index]) for index in order]
    main = cards[0]
    # The main card holds the transformer's non-block weights and the VAE, and runs the decode (and the encode of
    # input images).
    vae_peak = max(acts["denoise"], acts["decode"], acts["encode_image"])
    if not main.take(profile.transformer.other_bytes + profile.vae.weight_bytes, vae_peak):
        return None
    if stream_text_encoder:
        return _assign_streamed_text_encoder(profile, cards, acts, balanced=balanced)
    te = profile.text_encoder
    te_main: int | None = None
    whole = sum(profile.transformer.block_bytes) <= main.room(acts["denoise"])
    if whole:
        blocks = _spread(cards[:1], profile.transformer, acts["denoise"], 0)
    else:
        if balanced:
            # Before the blocks are spread by room, the text encoder gets a card of its own if one can hold it
            # and the blocks still fit; spreading first would leave no card room enough for it.
            blocks_total = sum(profile.transformer.block_bytes)
            te_main = _reserve(cards, te.weight_bytes, acts["encode"], blocks_total, acts["denoise"])
        spread = _spread_balanced if balanced else _spread
        blocks = spread(cards, profile.transformer, acts["denoise"], 0)
    if blocks is None:
        return None
    if te_main is not None:
        te_blocks = tuple(te_main for _ in te.block_bytes)
    else:
        # The text encoder: whole on a card of its own if one has room (the roomiest first), else whole on the
        # main card, else its blocks spread over the cards.
        by_room = sorted(cards[1:], key=lambda card: -card.room(acts["encode"])) + cards[:1]
        whole_on = next((card for card in by_room if card.take(te.weight_bytes, acts["encode"])), None)
        if whole_on is not None:
            te_main = whole_on.index
            te_blocks = tuple(te_main for _ in te.block_bytes)
        else:
            start = next((i for i, card in enumerate(cards) if card.take(te.other_bytes, acts["encode"])), None)
            if start is None:
                return None
            te_main = cards[start].index
            spread = _spread_balanced if balanced else _spread
            te_spread = spread(cards, te, acts["encode"], start)
            if te_spread is None:
                return None
            te_blocks = te_spread
    peaks = {card.index: card.weights + card.activation for card in cards if card.weights}
    return Assignment(main.index, blocks, te_main, te_blocks, peaks)


def _assign_streamed_text_encoder(
    profile: ModelProfile, cards: list[_Card], acts: dict[str, int], *, balanced: bool
) -> Assignment | None:
    """The transformer's blocks over the cards (the main card has taken its share already), the text encoder
    streamed onto the card with the most room left for it."""
    encode = streaming_bytes(profile.text_encoder) + acts["encode"]  # transient: only while the prompt is encoded
    blocks_total = sum(profile.transformer.block_bytes)
    te_main = _reserve(cards, 0, encode, blocks_total, acts["denoise"])
    if te_main is None:
        return None
    if blocks_total <= cards[0].room(acts["denoise"]):
        blocks = _spread(cards[:1], profile.transformer, acts["denoise"], 0)  # no need to split it
    else:
        blocks = (_spread_balanced if balanced else _spread)(cards, profile.transformer, acts["denoise"], 0)
    if blocks is None:
        return None
    peaks = {card.index: card.weights + card.activation for card in cards if card.weights or card.activation}
    return Assignment(cards[0].index, blocks, te_main, (), peaks, text_encoder_streamed=True)


def streaming_bytes(component: ComponentProfile) -> int:
    """GPU bytes a component streamed block by block needs while it runs: its non-block weights (copied in from
    their homes per call) and two blocks (the one computing and the one arriving)."""
    return component.other_bytes + 2 * component.largest_block_bytes


def _reserve(
    cards: list[_Card], nbytes: int, activation: int, transformer_blocks: int, denoise_activation: int
) -> int | None:
    """Give the text encoder a card (``nbytes`` of weights resident, ``activation`` while it encodes: the whole
    encoder, or what streaming it needs), keeping room for the transformer blocks; its card's index, or None.

    Cards other than the main one come first, roomiest first, so that the text encoder and the transformer
    end up on different cards when they can."""
    for card in sorted(cards[1:], key=lambda c: -c.room(activation)) + cards[:1]:
        saved = (card.weights, card.activation)
        if not card.take(nbytes, activation):
            continue
        if sum(max(c.room(denoise_activation), 0) for c in cards) >= transformer_blocks:
            return card.index
        card.weights, card.activation = saved
    return None


class MultiGPUDispatch(LoadStrategy):
    """The model spread over two or more GPUs with no CPU offload.

    Args:
        reserve_gib: memory to leave free on each card when assigning (the planner passes its reserve).
        workload: the image size and batch to leave room for (the planner passes the request's).
    """

    name: ClassVar[str] = "multi_gpu"
    offloads: ClassVar[bool] = False
    places_controlnet: ClassVar[bool] = False  # its hints would have to reach every card: not built
    #: the text encoder streams from host memory onto one card per prompt instead of holding a card
    stream_text_encoder: ClassVar[bool] = False
    # Install accelerate's hooks even when a component lands on one card (lets tests run this path on one GPU).
    _always_dispatch: ClassVar[bool] = False

    def __init__(self, reserve_gib: float = 1.0, workload: Workload | None = None) -> None:
        super().__init__(None)
        self.reserve_gib = reserve_gib
        self.workload = workload or Workload()
        self._placed: Assignment | None = None

    def identity(self) -> tuple[object, ...]:
        # The workload only sizes the headroom; an applied placement serves other sizes too.
        return (self.reserve_gib,)

    @property
    def placed(self) -> Assignment | None:
        """Which card holds what while the strategy is applied (None otherwise)."""
        return self._placed

    def assignment(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> Assignment | None:
        if len(hardware.gpus) < 2:
            return None
        reserve = int(self.reserve_gib * GIB)
        capacities = {g.index: int((g.free_bytes - reserve) / (1 + ALLOCATOR_MARGIN)) for g in hardware.gpus}
        return assign(profile, capacities, work, stream_text_encoder=self.stream_text_encoder)

    def estimate(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> MemoryEstimate:
        self.target(hardware)  # fewer than two GPUs: unavailable here, like any GPU strategy without a GPU
        if work.control and profile.controlnet is not None:
            # its hints would have to reach each block's card: not built; a single-card placement runs these
            return MemoryEstimate(gpu_peak={}, infeasible="does not place a ControlNet; single-GPU placements do")
        placed = self.assignment(profile, hardware, work)
        if placed is None:
            usable = sum(g.free_bytes for g in hardware.gpus) - len(hardware.gpus) * int(self.reserve_gib * GIB)
            acts = profile.activation_bytes(work)
            needed = self._gpu_weight_bytes(profile) + max(acts.values())
            return MemoryEstimate(
                gpu_peak={},
                infeasible=f"does not split over the GPUs: needs about {needed / GIB:.1f} GiB in all, "
                f"{usable / GIB:.1f} GiB usable",
            )
        host = self._host_bytes(profile)
        # a ControlNet loaded earlier waits in its host homes
        controlnet = profile.controlnet.weight_bytes if profile.controlnet is not None else 0
        return MemoryEstimate(gpu_peak=dict(placed.peaks), host_bytes=host + controlnet, pinned_bytes=host + controlnet)

    def _gpu_weight_bytes(self, profile: ModelProfile) -> int:
        return sum(c.weight_bytes for c in (profile.text_encoder, profile.transformer, profile.vae))

    def _host_bytes(self, profile: ModelProfile) -> int:
        return 0

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        return CROSS_GPU_OVERHEAD * sum(profile.compute_seconds(work, steps).values())

    def target(self, hardware: Hardware) -> torch.device:
        if len(hardware.gpus) < 2:
            raise StrategyUnavailableError(
                f"{self.name} needs at least two CUDA GPUs, and {len(hardware.gpus)} can be used here; "
                "use strategy='auto'"
            )
        return torch.device("cuda", max(hardware.gpus, key=lambda g: g.free_bytes).index)

    def gpu_index(self, hardware: Hardware) -> int:
        return self.target(hardware).index or 0

    def apply(self, pipe: Any, hardware: Hardware) -> None:
        # The live pipeline's sizes, so that placement follows exactly the same arithmetic as the estimate.
        profile = ModelProfile.from_modules(components(pipe))
        placed = self.assignment(profile, hardware, self.workload)
        if placed is None:
            raise torch.OutOfMemoryError(f"{self.name}: the model does not fit on these GPUs")
        homes = host_homes(pipe)
        force = self._always_dispatch
        main = torch.device("cuda", placed.main)
        with on_device(main):
            _place(pipe.transformer, profile.transformer, placed.main, placed.transformer_blocks, homes, force)
            homes.send_to(pipe.vae, main)
            homes.release(pipe.vae)
        te = profile.text_encoder
        if placed.text_encoder_streamed:
            # one prompt's worth of blocks at a time, from pinned homes (the non-block weights too: they are
            # needed only while the prompt is encoded, and every byte of these cards counts)
            stream(pipe.text_encoder, homes, torch.device("cuda", placed.text_encoder_main), level="block")
        else:
            with on_device(torch.device("cuda", placed.text_encoder_main)):
                _place(pipe.text_encoder, te, placed.text_encoder_main, placed.text_encoder_blocks, homes, force)
        self._placed = placed

    def execution_device(self, pipe: Any) -> torch.device:
        assert self._placed is not None, "execution_device() is known once the strategy is applied"
        return torch.device("cuda", self._placed.main)

    def encode_device(self, pipe: Any, execution_device: torch.device) -> torch.device:
        assert self._placed is not None
        return torch.device("cuda", self._placed.text_encoder_main)

    def remove(self, pipe: Any, keep: Collection[str] = ()) -> None:
        from accelerate.hooks import remove_hook_from_module

        homes = host_homes(pipe)
        if self._placed is not None and self._placed.text_encoder_streamed:
            unstream(pipe.text_encoder, homes)
        for module in (pipe.transformer, pipe.text_encoder):
            remove_hook_from_module(module, recurse=True)
            if hasattr(module, "hf_device_map"):
                del module.hf_device_map
        send_everything_home(pipe)
        self._placed = None
        self.placed_off()


class MultiGPUHybrid(MultiGPUDispatch):
    """The transformer and the VAE spread over two or more GPUs, the text encoder streamed onto one of them.

    For cards that together hold the transformer but not the whole model, e.g. two 8 GiB cards: every
    transformer pass runs from GPU memory, and only the text encoder (7.5 GiB) crosses the bus, once per
    prompt, from pinned host memory. Host RAM: the text encoder's pinned copy.
    """

    name: ClassVar[str] = "multi_gpu_hybrid"
    offloads: ClassVar[bool] = True
    stream_text_encoder: ClassVar[bool] = True

    def _gpu_weight_bytes(self, profile: ModelProfile) -> int:
        return profile.transformer.weight_bytes + profile.vae.weight_bytes + streaming_bytes(profile.text_encoder)

    def _host_bytes(self, profile: ModelProfile) -> int:
        te = profile.text_encoder
        return pinned_size(sum(te.block_bytes), te.largest_block_tensor_bytes) + te.other_bytes

    def predict_seconds(self, profile: ModelProfile, work: Workload, steps: int) -> float:
        compute = profile.compute_seconds(work, steps)
        te = profile.text_encoder
        encode = max(compute["encode"], profile.transfer_seconds(sum(te.block_bytes)))
        encode += BLOCK_OVERHEAD_S * len(te.block_bytes) + profile.transfer_seconds(te.other_bytes)
        return encode + CROSS_GPU_OVERHEAD * (compute["denoise"] + compute["encode_image"] + compute["decode"])


def _place(
    module: torch.nn.Module,
    profile: ComponentProfile,
    main: int,
    blocks: tuple[int, ...],
    homes: Any,
    force_hooks: bool = False,
) -> None:
    if all(gpu == main for gpu in blocks) and not force_hooks:
        homes.send_to(module, torch.device("cuda", main))
        homes.release(module)
        return
    from accelerate import dispatch_model

    # Weights come from their (pinned) homes; dispatch_model copies them to each block's card into new
    # parameter objects, so the homes are released through the old ones (by the new ones, nothing would be
    # found and 12 GiB of pinned host RAM stayed held: seen on two H200s).
    tensors = list(module_tensors(module))
    homes.send_home(tensors)
    device_map = device_map_for(module, dict(zip(profile.block_names, blocks, strict=True)), main)
    dispatch_model(module, device_map=device_map, main_device=main, force_hooks=force_hooks)
    homes.release(tensors)


def device_map_for(module: torch.nn.Module, block_gpus: dict[str, int], main: int) -> dict[str, int]:
    """An accelerate device map: each block on its GPU, every other module and tensor on ``main``."""
    device_map: dict[str, int] = {}

    def walk(prefix: str, node: torch.nn.Module) -> None:
        if prefix in block_gpus:
            device_map[prefix] = block_gpus[prefix]
            return
        if prefix and not any(block.startswith(prefix + ".") for block in block_gpus):
            device_map[prefix] = main
            return
        # Tensors held directly by a module that also contains blocks (the transformer's pad tokens) need
        # entries of their own: accelerate refuses a map that leaves any parameter out (and then warns that
        # these keys name no submodule, which is expected).
        for name, _ in node.named_parameters(recurse=False):
            device_map[f"{prefix}.{name}" if prefix else name] = main
        for name, _ in node.named_buffers(recurse=False):
            device_map[f"{prefix}.{name}" if prefix else name] = main
        for name, child in node.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", module)
    return device_map
