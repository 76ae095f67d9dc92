"""Safetensors weights read straight into the memory they will live in.

``from_pretrained`` loads a checkpoint into ordinary host memory first (or maps it), and an offloading
strategy then copies every weight again into pinned buffers: for a moment the host holds the weights twice
(34 GiB of peak RSS for 19 GiB of weights, measured). Here each tensor goes from the file to its final
place in one step:

* ``"homes"``: into its slot of a pinned host buffer (:class:`~zimage_turbo.host.HostHomes`), where
  offloading strategies want it (plain host tensors on machines without CUDA);
* a GPU: through a small ring of pinned staging buffers and asynchronous copies, so the host never holds
  more than a few staging chunks;
* ``"cpu"``: ordinary host tensors.

Files are read with positional reads into the destination's bytes (no mapping: a mapped file's pages count
as the process's memory while mapped, and a truncated file could kill the process with SIGBUS). A tensor
stored in another floating dtype than the one we run in (the published transformer is float32) is read
into staging memory and cast while it is copied, on the GPU where the destination is one.

The modules themselves come from their configs with empty (meta) parameters, built by the libraries' own
constructors, so the result is the module ``from_pretrained`` would give: the CPU tests compare both bit
for bit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from .errors import IncompleteModelError, ModelLoadError
from .host import HostHomes
from .safetensors_header import TensorEntry, read_safetensors_header

__all__ = [
    "EntryValues",
    "TensorEntry",
    "fill_module",
    "read_dtype",
    "read_entries",
    "read_safetensors_header",
    "read_tensors",
]

# Files are read in chunks of this size (by several threads: one core reads page cache at a few GB/s), and
# copies to a GPU go through this many staging chunks per thread: enough to keep the bus busy, few enough
# that the host holds only megabytes of them.
STAGING_CHUNK_BYTES = 16 * 2**20
STAGING_SLOTS = 3
READ_THREADS = min(8, os.cpu_count() or 1)
_SEEK_LOCK = threading.Lock()
T = TypeVar("T")
# Values read ahead of their module (:func:`read_entries`), by (file, tensor name).
EntryValues = Mapping[tuple[Path, str], torch.Tensor]


def read_dtype(entry: TensorEntry, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``entry`` is read in for a run in ``dtype``: floating tensors are cast to it, others keep theirs
    (the one rule for loading, reading ahead and the converted copy)."""
    return dtype if entry.dtype.is_floating_point else entry.dtype


def fill_module(
    module: torch.nn.Module,
    entries: Sequence[TensorEntry],
    *,
    dtype: torch.dtype,
    destination: str | torch.device,
    homes: HostHomes | None = None,
    on_bytes: Callable[[int], None] | None = None,
    ready: EntryValues | None = None,
) -> None:
    """Give every parameter and persistent buffer of ``module`` (built with meta parameters) its values from
    ``entries``, placed at ``destination``: ``"homes"`` (pinned host homes in ``homes``), ``"cpu"``, or a
    device. Floating tensors become ``dtype``; others keep theirs. ``ready``: the values :func:`read_entries`
    already read for this ``dtype`` and ``destination`` (not ``"homes"``), used instead of reading again.

    Raises :class:`~zimage_turbo.errors.ModelLoadError` naming the keys when the files and the module do not
    match (a missing tensor, an unexpected one, another shape).
    """
    targets = _named_tensors(module)
    by_name = _match(module, targets, entries)
    wanted = {name: read_dtype(entry, dtype) for name, entry in by_name.items()}
    unique = list(_unique(by_name))
    device = None if str(destination) in ("homes", "cpu") else torch.device(destination)
    into_homes = homes if destination == "homes" else None
    if ready is not None and into_homes is None and all((entry.path, entry.name) in ready for entry, _ in unique):
        values, group = [ready[entry.path, entry.name] for entry, _ in unique], None
        if on_bytes is not None:
            on_bytes(sum(entry.nbytes for entry, _ in unique))
    elif device is None:
        values, group = _read_to_host(unique, wanted, into_homes, on_bytes)
    elif device.type == "cuda":
        values, group = _read_to_cuda(unique, wanted, device, on_bytes), None
    else:  # another accelerator (MPS): through ordinary host memory
        host_values, group = _read_to_host(unique, wanted, None, on_bytes)
        values = [value.to(device) for value in host_values]
    for (_, names), value in zip(unique, values, strict=True):
        placed = _assign(module, names, value)
        if into_homes is not None and group is not None:
            into_homes.claim(placed, value, group)
    # Buffers that are not saved (RoPE frequency tables) were computed by the constructor on the CPU.
    if device is not None:
        for name, buffer in list(module.named_buffers()):
            if buffer.device != device:
                _assign(module, [name], buffer.to(device))
    if into_homes is not None:
        into_homes.adopt(module)  # the few tensors not read from the files (unsaved buffers) get homes too
    leftover = [name for name, tensor in _named_tensors(module).items() if tensor.is_meta]
    if leftover:
        raise ModelLoadError(f"{type(module).__name__}: no values for {', '.join(leftover[:5])}")


def read_entries(entries: Sequence[TensorEntry], dtype: torch.dtype, destination: torch.device) -> EntryValues:
    """Every tensor of ``entries`` read into ``destination`` (the CPU or a CUDA device) as :func:`fill_module`
    would read it there (floating ones cast to ``dtype``), before any module exists to put it in."""
    unique = [(entry, [str(index)]) for index, entry in enumerate(entries)]
    wanted = {names[0]: read_dtype(entry, dtype) for entry, names in unique}
    if destination.type == "cuda":
        values = _read_to_cuda(unique, wanted, destination, None)
    elif destination.type == "cpu":
        values, _ = _read_to_host(unique, wanted, None, None)
    else:
        raise ValueError(f"read_entries reads into the CPU or a CUDA device, not {destination}")
    return {(entry.path, entry.name): value for (entry, _), value in zip(unique, values, strict=True)}


def read_tensors(entries: Sequence[TensorEntry], dtype: torch.dtype) -> list[torch.Tensor]:
    """The values of ``entries`` in ordinary host memory, floating ones cast to ``dtype`` as loading casts them:
    an exact copy of what the model was loaded with (LoRA unloading restores weights from it)."""
    values = read_entries(entries, dtype, torch.device("cpu"))
    return [values[entry.path, entry.name] for entry in entries]


def _named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by their state-dict name (tied parameters appear under every name)."""
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    for prefix, child in module.named_modules(remove_duplicate=False):
        skipped: set[str] = getattr(child, "_non_persistent_buffers_set", set())
        for name, buffer in child.named_buffers(prefix=prefix, recurse=False):
            if name.rpartition(".")[2] not in skipped:
                tensors[name] = buffer
    return tensors


def _match(
    module: torch.nn.Module, targets: Mapping[str, torch.Tensor], entries: Sequence[TensorEntry]
) -> dict[str, TensorEntry]:
    """Pair module tensors with file entries; a checkpoint saved from a wrapper (``model.`` prefixes) is accepted
    for the bare model, and tied weights may be stored once."""
    stored = {entry.name: entry for entry in entries}
    prefix = getattr(module, "base_model_prefix", "")
    if prefix and not any(name in stored for name in targets) and any(n.startswith(prefix + ".") for n in stored):
        stored = {name.removeprefix(prefix + "."): entry for name, entry in stored.items()}
    tied = _tied_names(module, targets)
    matched: dict[str, TensorEntry] = {}
    missing = []
    for name, tensor in targets.items():
        entry = stored.get(name) or next((stored[t] for t in tied.get(name, ()) if t in stored), None)
        if entry is None:
            missing.append(name)
            continue
        if tuple(tensor.shape) != entry.shape:
            raise ModelLoadError(
                f"{entry.path}: tensor {entry.name!r} has shape {list(entry.shape)}, the model expects "
                f"{list(tensor.shape)}: the config and the weights do not belong together"
            )
        matched[name] = entry
    used = {(entry.path, entry.name) for entry in matched.values()}
    unexpected = sorted(name for name, entry in stored.items() if (entry.path, entry.name) not in used)
    if missing or unexpected:
        files = sorted({str(entry.path) for entry in entries})
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:5])}")
        raise ModelLoadError(
            f"{type(module).__name__} does not match its weight files ({', '.join(files)}): {'; '.join(parts)}"
        )
    return matched


def _tied_names(module: torch.nn.Module, targets: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, ...]]:
    """For each tensor name, the other names of the same tensor (tied embeddings)."""
    by_identity: dict[int, list[str]] = {}
    for name, tensor in targets.items():
        by_identity.setdefault(id(tensor), []).append(name)
    tied: dict[str, tuple[str, ...]] = {}
    for names in by_identity.values():
        for name in names:
            tied[name] = tuple(other for other in names if other != name)
    # transformers declares ties it makes after loading (lm_head <- embed_tokens) by name
    declared = getattr(module, "_tied_weights_keys", None)
    if isinstance(declared, Mapping) and getattr(getattr(module, "config", None), "tie_word_embeddings", False):
        for target, source in declared.items():
            tied[str(target)] = (*tied.get(str(target), ()), str(source))
    return tied


def _assign(module: torch.nn.Module, names: Sequence[str], value: torch.Tensor) -> torch.Tensor:
    """Put ``value`` under every name in ``names`` as one object (tied weights stay one parameter)."""
    placed: torch.Tensor | None = None
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            if placed is None:
                placed = torch.nn.Parameter(value, requires_grad=False)
            owner._parameters[leaf] = placed  # type: ignore[assignment]
        else:
            placed = value if placed is None else placed
            owner._buffers[leaf] = placed
    assert placed is not None
    return placed


def _unique(by_name: Mapping[str, TensorEntry]) -> list[tuple[TensorEntry, list[str]]]:
    """Each stored tensor once, with every module name that takes it, in file order (sequential reads)."""
    names: dict[tuple[Path, str], list[str]] = {}
    entries: dict[tuple[Path, str], TensorEntry] = {}
    for name, entry in by_name.items():
        key = (entry.path, entry.name)
        names.setdefault(key, []).append(name)
        entries[key] = entry
    order = sorted(entries, key=lambda k: (str(k[0]), entries[k].start))
    return [(entries[key], names[key]) for key in order]


class _Files:
    """The files of some entries, open for positional reads (safe from several threads at once)."""

    def __init__(self, entries: Iterable[TensorEntry]) -> None:
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)
        self._open = {path: os.open(path, flags) for path in {entry.path for entry in entries}}

    def read_into(self, entry: TensorEntry, target: torch.Tensor, offset: int = 0) -> None:
        """Read ``target.numel()`` bytes of ``entry`` starting ``offset`` bytes in, into the uint8 tensor ``target``."""
        fd = self._open[entry.path]
        view = memoryview(target.numpy()).cast("B")  # type: ignore[arg-type]
        done = 0
        while done < len(view):
            got = _pread_into(fd, view[done:], entry.start + offset + done)
            if got <= 0:
                message = f"{entry.path} ended while reading {entry.name!r}"
                raise IncompleteModelError(message, missing=[str(entry.path)])
            done += got

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


def _pread_into(fd: int, view: memoryview, position: int) -> int:
    preadv = getattr(os, "preadv", None)
    if preadv is not None:
        return int(preadv(fd, [view], position))
    with _SEEK_LOCK:  # no positional reads (Windows): seek and read must not interleave between threads
        os.lseek(fd, position, os.SEEK_SET)
        return os.readv(fd, [view])


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def _pieces(nbytes: int) -> list[tuple[int, int]]:
    """(offset, size) of the chunks a tensor is read in; sizes are multiples of 8, so chunks hold whole elements."""
    return [(offset, min(STAGING_CHUNK_BYTES, nbytes - offset)) for offset in range(0, nbytes, STAGING_CHUNK_BYTES)]


def _in_parallel(action: Callable[[T], None], items: Sequence[T]) -> None:
    """``action`` on every item, on READ_THREADS threads (reads and copies release the GIL)."""
    if READ_THREADS <= 1 or len(items) <= 1:
        for item in items:
            action(item)
        return
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for _ in pool.map(action, items):
            pass


def _read_to_host(
    unique: Sequence[tuple[TensorEntry, list[str]]],
    wanted: Mapping[str, torch.dtype],
    homes: HostHomes | None,
    on_bytes: Callable[[int], None] | None,
) -> tuple[list[torch.Tensor], int | None]:
    """Read every tensor into host memory: slots reserved in ``homes`` (pinned buffers), else a tensor each.
    Returns the values in the order of ``unique`` and the homes' group they belong to."""
    specs = [(entry.shape, wanted[names[0]]) for entry, names in unique]
    if homes is not None:
        values, group = homes.reserve(specs)
    else:
        values, group = [torch.empty(shape, dtype=dtype) for shape, dtype in specs], None
    files = _Files(entry for entry, _ in unique)
    work = [
        (entry, value, offset, size)
        for (entry, _), value in zip(unique, values, strict=True)
        for offset, size in _pieces(entry.nbytes)
    ]

    def read(item: tuple[TensorEntry, torch.Tensor, int, int]) -> None:
        entry, value, offset, size = item
        if entry.dtype == value.dtype:
            files.read_into(entry, _bytes_of(value)[offset : offset + size], offset)
        else:
            raw = torch.empty(size, dtype=torch.uint8)
            files.read_into(entry, raw, offset)
            first = offset // entry.dtype.itemsize
            count = size // entry.dtype.itemsize
            value.reshape(-1)[first : first + count].copy_(raw.view(entry.dtype))
        if on_bytes is not None:
            on_bytes(size)

    try:
        _in_parallel(read, work)
    finally:
        files.close()
    return values, group


class _Lane:
    """One reading thread's way to the GPU: its own stream and a small ring of pinned staging chunks."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        # Tensors are allocated on the current stream and written on ours: start after anything queued there.
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self.ring = [torch.empty(STAGING_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(STAGING_SLOTS)]
        self.done = [torch.cuda.Event() for _ in self.ring]  # type: ignore[no-untyped-call]
        self.used = [False] * len(self.ring)
        self.turn = 0

    def chunk(self, size: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        """A staging chunk the bus has finished with (waits for it if needed)."""
        turn = self.turn
        self.turn = (turn + 1) % len(self.ring)
        if self.used[turn]:
            self.done[turn].synchronize()
        self.used[turn] = True
        return self.ring[turn][:size], self.done[turn]


def _read_to_cuda(
    unique: Sequence[tuple[TensorEntry, list[str]]],
    wanted: Mapping[str, torch.dtype],
    device: torch.device,
    on_bytes: Callable[[int], None] | None,
) -> list[torch.Tensor]:
    """Read every tensor into a GPU tensor through rings of pinned staging chunks, one per thread: disk reads
    overlap bus transfers, and the host never holds more than the rings."""
    # Allocated here, on one thread, before any copy: an out-of-memory error comes before reading anything.
    values = [torch.empty(entry.shape, dtype=wanted[names[0]], device=device) for entry, names in unique]
    files = _Files(entry for entry, _ in unique)
    lanes: list[_Lane] = []
    local = threading.local()
    lock = threading.Lock()

    def lane() -> _Lane:
        mine: _Lane | None = getattr(local, "lane", None)
        if mine is None:
            mine = local.lane = _Lane(device)
            with lock:
                lanes.append(mine)
        return mine

    def read(index: int) -> None:
        entry, value = unique[index][0], values[index]
        way = lane()
        cast = entry.dtype != value.dtype
        # A cast needs the stored bytes on the GPU first: they land in a scratch tensor there.
        with torch.cuda.stream(way.stream):
            landing = torch.empty(entry.nbytes, dtype=torch.uint8, device=device) if cast else _bytes_of(value)
        for offset, size in _pieces(entry.nbytes):
            chunk, done = way.chunk(size)
            files.read_into(entry, chunk, offset)
            with torch.cuda.stream(way.stream):
                landing[offset : offset + size].copy_(chunk, non_blocking=True)
                done.record(way.stream)
        if cast:
            with torch.cuda.stream(way.stream):
                value.copy_(landing.view(entry.dtype).view(entry.shape))
        if on_bytes is not None:
            on_bytes(entry.nbytes)

    try:
        _in_parallel(read, list(range(len(unique))))
        for each in lanes:
            each.stream.synchronize()
    finally:
        files.close()
    return values
