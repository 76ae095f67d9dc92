"""What a safetensors file holds, read from its header and checked before a byte of weights is read: a
truncated file, a malformed header or overlapping tensors are named here, as an error of the model's files,
rather than found by the loader (or by a fault while the file is mapped)."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import IncompleteModelError, ModelLoadError

__all__ = ["DTYPE_NAMES", "TensorEntry", "read_safetensors_header"]

# A safetensors header larger than this is not a real checkpoint.
_HEADER_LIMIT = 100 * 2**20
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# torch dtype -> its name in a safetensors header
DTYPE_NAMES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its name, dtype and shape as stored, and where its bytes are."""

    path: Path
    name: str
    dtype_name: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype_name]


def read_safetensors_header(path: Path) -> list[TensorEntry]:
    """Every tensor of a safetensors file (header only), after checking that the file is not truncated.

    Raises :class:`~zimage_turbo.errors.IncompleteModelError` for a file that is gone (a broken link, say),
    truncated or malformed, and :class:`~zimage_turbo.errors.ModelLoadError` for one that cannot be read.
    """
    try:
        size, prefix, header_length, raw = _read_header_bytes(path)
    except FileNotFoundError:
        raise IncompleteModelError(f"{path} is missing (or a broken link)", missing=[str(path)]) from None
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    if len(prefix) < 8:
        raise IncompleteModelError(f"{path} is truncated ({size} bytes)", missing=[str(path)])
    if raw is None:
        raise IncompleteModelError(
            f"{path} is truncated or not a safetensors file (header of {header_length} bytes, file of {size})",
            missing=[str(path)],
        )
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a huge number, deep nesting
        raise IncompleteModelError(f"{path}: unreadable safetensors header ({exc})", missing=[str(path)]) from None
    if not isinstance(header, dict):
        raise IncompleteModelError(f"{path}: the safetensors header is not a JSON object", missing=[str(path)])
    entries: list[TensorEntry] = []
    data_start = 8 + header_length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype_name, shape, first, last = _header_entry(path, name, entry)
        if dtype_name not in _TORCH_DTYPES:
            raise ModelLoadError(f"{path}: tensor {name!r} has dtype {dtype_name}, which zimage-turbo does not load")
        entries.append(TensorEntry(path, name, dtype_name, shape, data_start + first, last - first))
    spans = sorted(entries, key=lambda e: e.start)
    for before, after in itertools.pairwise(spans):
        if after.start < before.start + before.nbytes:
            raise IncompleteModelError(
                f"{path}: tensors {before.name!r} and {after.name!r} overlap in the safetensors data",
                missing=[str(path)],
            )
    end = max((e.start + e.nbytes for e in entries), default=data_start)
    if end > size:
        raise IncompleteModelError(
            f"{path} is truncated: its header describes {end} bytes, the file has {size}", missing=[str(path)]
        )
    return entries


def _read_header_bytes(path: Path) -> tuple[int, bytes, int, bytes | None]:
    """(file size, first 8 bytes, header length they give, the header's bytes or None if it cannot fit)."""
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        prefix = stream.read(8)
        if len(prefix) < 8:
            return size, prefix, 0, None
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(_HEADER_LIMIT, size - 8):
            return size, prefix, header_length, None
        return size, prefix, header_length, stream.read(header_length)


def _header_entry(path: Path, name: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """One tensor's (dtype, shape, begin, end) from a safetensors header, checked: a malformed entry is named
    here rather than found by the loader (or by a fault while the file is mapped)."""

    def refuse(why: str) -> IncompleteModelError:
        return IncompleteModelError(f"{path}: tensor {name!r} in the safetensors header {why}", missing=[str(path)])

    if not isinstance(entry, dict):
        raise refuse("is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise refuse(f"has no dtype ({dtype!r})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise refuse(f"has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise refuse(f"has invalid data_offsets {offsets!r}")
    begin, stop = offsets
    element = _TORCH_DTYPES[dtype].itemsize if dtype in _TORCH_DTYPES else None
    if element is not None and stop - begin != math.prod(shape) * element:
        raise refuse(f"covers {stop - begin} bytes, but {dtype} {shape} needs {math.prod(shape) * element}")
    return dtype, tuple(shape), begin, stop
