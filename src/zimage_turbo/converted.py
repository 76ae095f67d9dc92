"""A local copy of the model's weights in the dtype they run in, written once and read by every later load.

The published checkpoint stores the transformer in float32 (24.6 of its 32.9 GB): each load reads twice the
bytes it needs and casts every one of them. The converted copy is a pipeline folder like the source (the same
configs, tokenizer and scheduler, each component's weights in one safetensors file under its usual name) whose
floating weights are stored in the run dtype, cast exactly as loading casts them: an image made from the copy
is the image made from the source, bit for bit.

It lives in the cache (``<cache_dir>/converted``, else ``~/.cache/zimage-turbo/converted``), in a folder named
after the model, the dtype and a fingerprint of the source's weight files (name, size, modification time of
each): a changed source is a different folder, and the old copy is stale. A manifest written last records the
fingerprint and each file's size, modification time and SHA-256. A copy is used only if its manifest matches
and every file has the recorded size and time (a file whose time changed is hashed again); otherwise it is
removed, and made again. It is written into a temporary folder and renamed into place, after checking that the
disk has room, so that no half-written copy is ever used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from ._version import __version__
from .errors import IncompleteModelError, NotEnoughDiskSpaceError, ZImageError
from .layout import WEIGHTED_COMPONENTS, check_pipeline_dir
from .safetensors_header import DTYPE_NAMES, TensorEntry, read_safetensors_header
from .settings import ZImageSettings
from .sources import DISK_MARGIN_BYTES, ResolvedModel, free_disk_bytes
from .weight_files import WEIGHT_NAMES
from .weights import read_dtype, read_tensors

__all__ = ["converted_root", "copy_folder", "find_copy", "start_background_copy", "worth_converting", "write_copy"]

logger = logging.getLogger(__name__)

MANIFEST = "zimage-turbo-converted.json"
FORMAT = 1
# Weights read (and cast) at a time while writing: the host holds about this much of them at once.
BATCH_BYTES = 512 * 2**20
# Folders of the pipeline copied as they are; of each weighted component only its JSON files (configs).
_PLAIN_FOLDERS = ("scheduler", "tokenizer")


def converted_root(settings: ZImageSettings) -> Path:
    if settings.cache_dir is not None:
        return settings.cache_dir / "converted"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zimage-turbo" / "converted"


def fingerprint(model: ResolvedModel) -> dict[str, Any]:
    """What identifies the source's weights: each weight file's name, size and modification time."""
    files = []
    for component in WEIGHTED_COMPONENTS:
        for path in model.layout.weight_paths(component):
            stat = path.stat()
            files.append([path.relative_to(model.layout.root).as_posix(), stat.st_size, stat.st_mtime_ns])
    return {"name": model.name, "revision": model.revision, "files": files}


def copy_folder(model: ResolvedModel, dtype: torch.dtype, settings: ZImageSettings) -> Path:
    """Where the converted copy of ``model`` in ``dtype`` is (or would be)."""
    key = hashlib.sha256(json.dumps(fingerprint(model), sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^\w.-]+", "-", model.name or model.layout.root.name).strip("-") or "model"
    return converted_root(settings) / f"{name}-{_dtype_name(dtype)}-{key}"


def worth_converting(model: ResolvedModel, dtype: torch.dtype) -> bool:
    """Whether the source stores floating weights in another dtype than ``dtype`` (the copy then reads fewer
    bytes, or at least casts none)."""
    return any(
        entry.dtype.is_floating_point and entry.dtype != dtype
        for component in WEIGHTED_COMPONENTS
        for path in model.layout.weight_paths(component)
        for entry in read_safetensors_header(path)
    )


def find_copy(model: ResolvedModel, dtype: torch.dtype, settings: ZImageSettings) -> ResolvedModel | None:
    """The converted copy of ``model`` in ``dtype`` when there is a sound one; a stale or damaged one is removed
    (and None returned, so that the source is read and the copy made again)."""
    folder = copy_folder(model, dtype, settings)
    if not folder.is_dir():
        return None
    problem = _problem(folder, fingerprint(model), dtype)
    if not problem:
        try:
            layout = check_pipeline_dir(folder)
        except IncompleteModelError as exc:
            problem = str(exc).splitlines()[0]
        else:
            logger.info("reading the converted copy %s", folder)
            return ResolvedModel(
                path=folder, source="converted", layout=layout, name=model.name, revision=model.revision
            )
    logger.warning("the converted copy %s is not usable (%s): removed, and made again from the source", folder, problem)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def write_copy(model: ResolvedModel, dtype: torch.dtype, settings: ZImageSettings) -> Path:
    """Write the converted copy of ``model`` in ``dtype`` (replacing a stale one) and return its folder.

    Raises :class:`~zimage_turbo.errors.NotEnoughDiskSpaceError` before writing anything when the disk lacks
    room for it (plus a margin).
    """
    folder = copy_folder(model, dtype, settings)
    source = model.layout.root
    entries = {
        c: [e for p in model.layout.weight_paths(c) for e in read_safetensors_header(p)] for c in WEIGHTED_COMPONENTS
    }
    sizes = {c: sum(_stored_bytes(e, dtype) for e in listed) for c, listed in entries.items()}
    needed = sum(sizes.values()) + sum(path.stat().st_size for path, _ in _plain_files(source))
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = free_disk_bytes(folder.parent)
    if needed + DISK_MARGIN_BYTES > free:
        raise NotEnoughDiskSpaceError(
            f"the converted copy of {model.name or source} needs {needed / 2**30:.1f} GiB (plus "
            f"{DISK_MARGIN_BYTES / 2**30:.0f} GiB to spare) in {folder.parent}, which has {free / 2**30:.1f} GiB free; "
            "nothing was written. Free some space, point cache_dir elsewhere, or set converted_copy='off'.",
            needed_bytes=needed,
            free_bytes=free,
            folder=str(folder.parent),
        )
    _remove_abandoned(folder)
    staging = folder.parent / f".{folder.name}.writing-{os.getpid()}-{threading.get_ident()}"
    started = time.perf_counter()
    try:
        for path, relative in _plain_files(source):
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, staging / relative)
        digests = {}
        for component, listed in entries.items():
            relative = f"{component}/{WEIGHT_NAMES[component]}.safetensors"
            (staging / component).mkdir(parents=True, exist_ok=True)
            digests[relative] = _write_safetensors(staging / relative, listed, dtype)
        files = {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            stat, relative = path.stat(), path.relative_to(staging).as_posix()
            digest = digests.get(relative) or _sha256(path)
            files[relative] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        manifest = {
            "format": FORMAT,
            "dtype": _dtype_name(dtype),
            "source": fingerprint(model),
            "files": files,
            "zimage_turbo": __version__,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        _sync_tree(staging)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        _remove_older(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "wrote the converted copy %s (%.1f GiB) in %.1f s", folder, needed / 2**30, time.perf_counter() - started
    )
    return folder


def start_background_copy(model: ResolvedModel, dtype: torch.dtype, settings: ZImageSettings) -> threading.Thread:
    """:func:`write_copy` in a daemon thread: a process that ends first leaves no copy (its temporary folder
    is removed by the next attempt), never a half-written one in use. Failures are logged, not raised."""

    def write() -> None:
        try:
            write_copy(model, dtype, settings)
        except (ZImageError, OSError) as exc:
            logger.warning("no converted copy of %s: %s", model.name or model.path, str(exc).splitlines()[0])

    thread = threading.Thread(target=write, name="zimage-turbo-convert", daemon=True)
    thread.start()
    return thread


def _remove_abandoned(folder: Path) -> None:
    """Temporary folders of copies whose writing process has ended (killed, or a daemon thread cut short at
    exit): gigabytes that nothing else would remove."""
    for staging in folder.parent.glob(f".{folder.name}.writing-*"):
        pid = staging.name.rsplit(".writing-", 1)[1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _remove_older(folder: Path) -> None:
    """Copies of the same model and dtype made from an older source (another fingerprint): never used again."""
    stem = folder.name.rsplit("-", 1)[0]
    for other in folder.parent.glob(f"{stem}-*"):
        if other != folder and other.is_dir() and re.fullmatch(r"[0-9a-f]{16}", other.name.rsplit("-", 1)[1]):
            logger.info("removing the converted copy of an older source: %s", other)
            shutil.rmtree(other, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


# -- checking ---------------------------------------------------------------------------------------------


def _problem(folder: Path, source: dict[str, Any], dtype: torch.dtype) -> str:
    """Why the copy in ``folder`` cannot stand for ``source`` in ``dtype`` ("" when it can)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable manifest"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return "another format"
    if manifest.get("source") != source or manifest.get("dtype") != _dtype_name(dtype):
        return "made from another version of the source"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "its manifest lists no files"
    for relative, recorded in files.items():
        path = folder / relative
        try:
            stat = path.stat()
        except OSError:
            return f"{relative} is missing"
        if not isinstance(recorded, dict) or stat.st_size != recorded.get("size"):
            return f"{relative} has another size"
        if stat.st_mtime_ns != recorded.get("mtime_ns") and _sha256(path) != recorded.get("sha256"):
            return f"{relative} was changed"
    return ""


# -- writing ----------------------------------------------------------------------------------------------


def _plain_files(source: Path) -> list[tuple[Path, str]]:
    """(path, path relative to the pipeline) of every file the copy takes as it is: the pipeline's index, the
    scheduler and tokenizer, each component's JSON files but a shard index."""
    found = [(source / "model_index.json", "model_index.json")]
    for folder in (*_PLAIN_FOLDERS, *WEIGHTED_COMPONENTS):
        for path in sorted((source / folder).iterdir()):
            if not path.is_file():
                continue
            if folder in WEIGHTED_COMPONENTS and (path.suffix != ".json" or path.name.endswith(".index.json")):
                continue
            found.append((path, f"{folder}/{path.name}"))
    return found


def _stored_bytes(entry: TensorEntry, dtype: torch.dtype) -> int:
    return entry.nbytes // entry.dtype.itemsize * read_dtype(entry, dtype).itemsize


def _write_safetensors(path: Path, entries: Sequence[TensorEntry], dtype: torch.dtype) -> str:
    """A safetensors file of ``entries`` with floating tensors in ``dtype``, written tensor by tensor (the host
    never holds the whole component); returns its SHA-256."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "zimage_turbo_converted": _dtype_name(dtype)}}
    offset = 0
    for entry in entries:
        stored = read_dtype(entry, dtype)
        size = _stored_bytes(entry, dtype)
        header[entry.name] = {
            "dtype": DTYPE_NAMES[stored],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for part in (len(encoded).to_bytes(8, "little"), encoded):
            handle.write(part)
            digest.update(part)
        for batch in _batches(entries):
            for value in read_tensors(batch, dtype):
                data = memoryview(cast(Any, value.contiguous().reshape(-1).view(torch.uint8).numpy()))
                handle.write(data)
                digest.update(data)
        handle.flush()
        os.fsync(handle.fileno())
    return digest.hexdigest()


def _batches(entries: Sequence[TensorEntry]) -> Iterable[list[TensorEntry]]:
    batch: list[TensorEntry] = []
    size = 0
    for entry in entries:
        batch.append(entry)
        size += entry.nbytes
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _sync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
