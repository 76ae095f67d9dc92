"""Host-side homes for weights that are not on a GPU: one copy each, pinned when a GPU is present.

Offloading strategies move weights between the host and a GPU many times per image. Two things make that
expensive in host RAM if done naively (the 44.8 GiB of diffusers' streamed offload for 20.7 GB of weights):

* copying a weight back to the host allocates a new host tensor each time, while the old one may linger;
* PyTorch's pinned allocator rounds every request up to a power of two (a 362 MB block takes 512 MB).

So every weight gets one *home*: a slice of a pinned buffer whose size is itself a power of two (nothing
is lost to rounding except the tail of the last buffer). Sending a weight home is then a pointer swap
(``param.data = home``) with no copy, because weights never change; bringing it to a GPU is a
``non_blocking`` copy from pinned memory at full PCIe speed. diffusers' group offloading reuses these
homes as they are: ``pin_memory()`` of an already pinned tensor returns the tensor itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import logging
import math
from collections.abc import Iterable, Iterator

import torch

__all__ = ["HostHomes", "module_tensors", "pack_tensors", "return_freed_memory"]

logger = logging.getLogger(__name__)

# Pinned buffers are 1 GiB (PyTorch's pinned allocator keeps power-of-two sizes exact); a component's last
# buffer is the smallest power of two that holds the rest. Every weight of Z-Image-Turbo (the largest is the
# 778 MB token embedding of the text encoder) fits in one buffer.
CHUNK_BYTES = 1 << 30
# Start of each packed tensor: aligned for any dtype and for fast DMA.
ALIGNMENT = 256
# Threads that allocate (and so pin) buffers at once.
PIN_THREADS = 4


def module_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter and buffer of ``module``, once each (tied weights are one tensor)."""
    seen: set[int] = set()
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _Packer:
    """Places tensors one after another into host buffers allocated on demand, so that the originals can be
    freed as we go: peak host memory is the weights plus one buffer, not twice the weights.

    With ``device="meta"`` it only lays the tensors out (``placements``, and ``buffers`` on the meta device for
    their sizes), for buffers that are allocated afterwards, in parallel (see :func:`_allocate_pinned`)."""

    def __init__(self, *, pin: bool, pending_bytes: int, chunk_bytes: int, device: str = "cpu") -> None:
        self.pin = pin
        self.pending = pending_bytes
        self.chunk_bytes = chunk_bytes
        self.device = device
        self.buffers: list[torch.Tensor] = []
        self.placements: list[tuple[int, int]] = []  # (buffer index, byte offset) of each slot, in order
        self.used = 0

    def slot(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of this shape and dtype inside the current buffer (or a new one)."""
        nbytes = math.prod(shape) * dtype.itemsize
        start = _round_up(self.used, ALIGNMENT)
        if nbytes and (not self.buffers or start + nbytes > self.buffers[-1].numel()):
            # A new buffer: a full chunk, or for the tail only the next power of two above what is left.
            wanted = min(self.chunk_bytes, 1 << max(self.pending - 1, 1).bit_length())
            size = max(wanted, nbytes)
            pinned = self.pin and self.device == "cpu"
            self.buffers.append(torch.empty(size, dtype=torch.uint8, device=self.device, pin_memory=pinned))
            start = 0
        if not nbytes:
            self.placements.append((-1, 0))
            return torch.empty(shape, dtype=dtype)
        self.placements.append((len(self.buffers) - 1, start))
        self.used = start + nbytes
        self.pending -= nbytes
        return self.buffers[-1][start : start + nbytes].view(dtype).view(shape)

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        view = self.slot(tuple(tensor.shape), tensor.dtype)
        view.copy_(tensor.detach())
        return view


def _allocate_pinned(sizes: list[int]) -> list[torch.Tensor]:
    """Pinned buffers of these sizes, allocated by several threads: pinning faults in and locks every page,
    which for gigabytes takes seconds that spread well over cores."""
    from concurrent.futures import ThreadPoolExecutor

    def allocate(size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.uint8, pin_memory=True)

    with ThreadPoolExecutor(max_workers=max(1, min(PIN_THREADS, len(sizes)))) as pool:
        return list(pool.map(allocate, sizes))


def pack_tensors(
    tensors: list[torch.Tensor], *, pin: bool, chunk_bytes: int = CHUNK_BYTES
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Copy ``tensors`` into a few contiguous host buffers; return (views in the same order, the buffers).

    Each view has the original's dtype, shape and values. Buffers are pinned when ``pin``.
    """
    pending = sum(t.numel() * t.element_size() for t in tensors)
    packer = _Packer(pin=pin, pending_bytes=pending, chunk_bytes=chunk_bytes)
    views = [packer.place(t) for t in tensors]
    return views, packer.buffers


class HostHomes:
    """The host copy of every weight of a pipeline that lives (also) on the host.

    ``adopt(tensors)`` gives each weight a home (copying it from wherever it is, once) and points it there
    (without pinning, a weight already on the host is its own home);
    ``send_home(tensors)`` points weights back at their homes (no copy; weights without a home that sit on a
    GPU are adopted); ``send_to(tensors, device)`` copies them from their homes to ``device``;
    ``release(tensors)`` forgets the homes of weights that now live on a GPU for good, freeing host RAM.
    All methods also take a module, meaning all its parameters and buffers.
    """

    def __init__(self, *, pin: bool) -> None:
        self.pin = pin
        self._homes: dict[int, torch.Tensor] = {}
        self._group_of: dict[int, int] = {}  # tensor id -> the buffer group holding its home
        self._groups: dict[int, tuple[set[int], list[torch.Tensor]]] = {}  # group -> (its tensors, its buffers)
        self._group_numbers = itertools.count()

    @property
    def host_bytes(self) -> int:
        """Bytes held in host buffers by this object (pinned when ``pin``)."""
        return sum(b.numel() for _, buffers in self._groups.values() for b in buffers)

    def home_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The host home of ``tensor``, or None when it has none (it lives only where its data is)."""
        return self._homes.get(id(tensor))

    def has_home(self, what: torch.nn.Module | Iterable[torch.Tensor]) -> bool:
        return all(id(t) in self._homes for t in _as_tensors(what))

    def adopt(self, what: torch.nn.Module | Iterable[torch.Tensor]) -> None:
        """Give every weight a host home (idempotent) and point it there."""
        tensors = list(_as_tensors(what))
        new = [t for t in tensors if id(t) not in self._homes]
        for tensor in tensors:
            if id(tensor) in self._homes:
                tensor.data = self._homes[id(tensor)]
        if not new:
            return
        if not self.pin:
            # Without a GPU there is nothing to pin, and repacking would only move the weights (and change
            # their alignment, which changes CPU matmul rounding): host tensors are their own homes.
            for tensor in new:
                tensor.data = tensor.data if tensor.device.type == "cpu" else tensor.data.cpu()
                self._homes[id(tensor)] = tensor.data
            return
        pending = sum(t.numel() * t.element_size() for t in new)
        packer = _Packer(pin=self.pin, pending_bytes=pending, chunk_bytes=CHUNK_BYTES)
        group = next(self._group_numbers)
        self._groups[group] = ({id(t) for t in new}, packer.buffers)
        for tensor in new:
            # Re-point at once, so the original (a device copy, or the pageable copy from loading) is freed
            # before the next buffer is allocated.
            view = packer.place(tensor.data)
            tensor.data = view
            self._homes[id(tensor)] = view
            self._group_of[id(tensor)] = group
        logger.debug(
            "host homes for %d tensors: %.2f GiB%s",
            len(new),
            sum(b.numel() for b in packer.buffers) / 2**30,
            " pinned" if self.pin else "",
        )
        return_freed_memory()

    def reserve(self, specs: Iterable[tuple[tuple[int, ...], torch.dtype]]) -> tuple[list[torch.Tensor], int]:
        """Uninitialised homes for tensors of these (shape, dtype), to be filled in place (loading reads weights
        straight into them) and then given to their tensors with :meth:`claim`. Returns the slots and the
        group to claim them in. Pinned: packed into shared buffers; unpinned: a tensor each, like any host
        tensor (see :meth:`adopt`)."""
        specs = list(specs)
        group = next(self._group_numbers)
        if not self.pin:
            slots = [torch.empty(shape, dtype=dtype) for shape, dtype in specs]
            self._groups[group] = (set(), [])
            return slots, group
        pending = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs)
        layout = _Packer(pin=True, pending_bytes=pending, chunk_bytes=CHUNK_BYTES, device="meta")
        for shape, dtype in specs:
            layout.slot(shape, dtype)
        buffers = _allocate_pinned([buffer.numel() for buffer in layout.buffers])
        slots = [
            buffers[index][start : start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            if index >= 0
            else torch.empty(shape, dtype=dtype)
            for (shape, dtype), (index, start) in zip(specs, layout.placements, strict=True)
        ]
        self._groups[group] = (set(), buffers)
        return slots, group

    def claim(self, tensor: torch.Tensor, slot: torch.Tensor, group: int) -> None:
        """Make ``slot`` (from :meth:`reserve`) the home of ``tensor``, which should already point at it."""
        self._homes[id(tensor)] = slot
        self._group_of[id(tensor)] = group
        self._groups[group][0].add(id(tensor))

    def forget_group(self, group: int) -> None:
        """Forget a group of homes whole (from :meth:`reserve` or :meth:`adopt`): its buffers are freed once no
        tensor uses them. For slots reserved and never (or not all) claimed, when an error stopped the fill."""
        members, _ = self._groups.pop(group, (set(), []))
        for key in members:
            self._homes.pop(key, None)
            self._group_of.pop(key, None)

    def send_home(self, what: torch.nn.Module | Iterable[torch.Tensor]) -> None:
        """Point every weight at its home (device copies are freed); weights without one are adopted."""
        orphans = []
        for tensor in _as_tensors(what):
            home = self._homes.get(id(tensor))
            if home is None:
                if tensor.device.type != "cpu":
                    orphans.append(tensor)
            elif tensor.data is not home:
                tensor.data = home
        if orphans:
            self.adopt(orphans)

    def send_to(self, what: torch.nn.Module | Iterable[torch.Tensor], device: torch.device) -> None:
        """Copy every weight from its home to ``device`` (asynchronous from pinned memory)."""
        for tensor in _as_tensors(what):
            source = self._homes.get(id(tensor), tensor.data)
            tensor.data = source.to(device, non_blocking=self.pin)

    def release(self, what: torch.nn.Module | Iterable[torch.Tensor]) -> None:
        """Forget the homes of weights that now live elsewhere for good; frees buffers no longer used."""
        for tensor in _as_tensors(what):
            key = id(tensor)
            self._homes.pop(key, None)
            group = self._group_of.pop(key, None)
            if group is None:
                continue
            members, _ = self._groups[group]
            members.discard(key)
            if not members:
                del self._groups[group]

    def clear(self) -> None:
        self._homes.clear()
        self._group_of.clear()
        self._groups.clear()


def _as_tensors(what: torch.nn.Module | Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    return module_tensors(what) if isinstance(what, torch.nn.Module) else iter(what)


def return_freed_memory() -> None:
    """glibc keeps freed heap memory for reuse; after replacing gigabytes of weights, give it back (Linux)."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
