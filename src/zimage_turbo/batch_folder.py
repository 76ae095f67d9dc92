"""The output folder of a batch: writing each image safely, and its manifest (read after a crash, cleaned, appended).

The guarantees (an image is on disk before its line; every image listed exactly once) are described in
:mod:`zimage_turbo.batch`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .batch_items import BatchItem, check_id
from .batch_lock import lock_folder, lock_timeout
from .errors import BatchConflictError, InvalidRequestError
from .result import GenerationResult, save_image_atomically

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "image_is_whole",
    "manifest_row",
    "open_output",
    "output_folder",
    "prepare",
    "write_image",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
# What must match between a manifest line and an input line for the image to count as done.
_IDENTITY = (
    "prompt", "seed", "width", "height", "steps", "file", "loras",
    "image", "mask", "strength", "control", "control_scale",
)  # fmt: skip
# How many conflicting ids a BatchConflictError spells out.
_SHOWN = 3


def write_image(folder: Path, item: BatchItem, result: GenerationResult) -> Path:
    """Write ``item``'s image atomically, with how it was made (see :meth:`GenerationResult.metadata`), and
    make sure it is on disk (before its manifest line may be)."""
    # Items are checked when read; checked again here because a Ray actor gets them as JSON, and a file
    # written outside the folder cannot be taken back.
    check_id(item.id, "batch item")
    path = folder / item.file
    save_image_atomically(result.image, path, result.metadata(0))
    _sync(path)
    _sync(folder)  # the rename itself
    return path


def manifest_row(item: BatchItem, result: GenerationResult, **extra: Any) -> dict[str, Any]:
    """The manifest line of one image."""
    downscaled = (result.width, result.height) != (item.width, item.height)
    return {
        "id": item.id,
        "prompt": item.prompt,
        "seed": result.seed,
        "file": item.file,
        "width": result.width,
        "height": result.height,
        "steps": result.steps,
        "line": item.line,
        "strategy": result.strategy,
        "device": result.device,
        "dtype": result.dtype,
        "vae_tiling": result.vae_tiling,
        "timings": result.timings.to_dict(),
        "fallbacks": [str(f) for f in result.fallbacks],
        "warnings": list(result.warnings),
        "loras": dict(result.loras),
        # image-to-image, inpainting and ControlNet lines: their inputs (absent from text-to-image lines, which
        # they match)
        **({"image": item.image, "mask": item.mask, "strength": item.strength} if item.image is not None else {}),
        **({"control": item.control, "control_scale": item.control_scale} if item.control is not None else {}),
        # allow_downscale made the image smaller than asked: the line must still be recognised as this item's
        # when the batch is resumed (else it would be a conflict, or redone, on every run).
        **({"requested": {"width": item.width, "height": item.height}} if downscaled else {}),
        **extra,
    }


class Manifest:
    """The manifest of an output folder: read (tolerating what a crash leaves), compacted, appended to."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME

    def rows(self) -> list[dict[str, Any]]:
        """Its readable lines, in order; a half-written line (a crash while appending) is left out."""
        return self._read()[0]

    def _read(self) -> tuple[list[dict[str, Any]], bool]:
        """(rows, whether the file needs rewriting to be clean)."""
        if not self.path.is_file():
            return [], False
        data = self.path.read_bytes()
        rows: list[dict[str, Any]] = []
        dirty = bool(data) and not data.endswith(b"\n")
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("file"), str):
                logger.warning(
                    "%s line %d is incomplete or unreadable; its image will be made again", self.path, number
                )
                dirty = True
                continue
            rows.append(row)
        return rows, dirty

    def done(self, items: Sequence[BatchItem], *, overwrite: bool = False) -> set[str]:
        """Ids of ``items`` whose image and matching manifest line exist. First the manifest is made clean:
        unreadable lines, lines whose image is missing and lines that disagree with ``items`` (an id now
        with another prompt, seed, size or steps) are dropped, and for an id listed twice only the last line
        stays, so that rerunning never lists an image twice. The image of each line kept for ``items`` is
        checked (see :func:`image_is_whole`); a damaged one loses its line, so that it is made again.

        Raises:
            BatchConflictError: some ``items`` have an image made with other parameters, and not
                ``overwrite``. Raised before anything is changed.
        """
        wanted = {item.id: item for item in items}
        rows, dirty = self._read()
        kept: dict[str, dict[str, Any]] = {}
        replaced: dict[str, str] = {}  # id -> what differs, for a line that disagrees while its image is there
        for row in rows:
            item = wanted.get(row["id"])
            differs = _differences(row, item) if item is not None else []
            present = (self.folder / (item.file if item is not None else row["file"])).is_file()
            if differs or not present:
                if differs and present:
                    replaced[row["id"]] = ", ".join(differs)
                dirty = True
                continue
            if row["id"] in kept:
                dirty = True
            kept[row["id"]] = row
        conflicts = [item.id for item in items if item.id in replaced and item.id not in kept]
        if conflicts and not overwrite:
            raise _conflict(self.folder, conflicts, replaced)
        for item_id in [item_id for item_id in kept if item_id in wanted]:
            path, row = self.folder / wanted[item_id].file, kept[item_id]
            # The line's size, not the item's: the two differ only when allow_downscale made the image smaller.
            width, height = row.get("width"), row.get("height")
            if not (isinstance(width, int) and isinstance(height, int) and image_is_whole(path, width, height)):
                logger.warning("%s is listed as done but is not a whole %sx%s PNG: made again", path, width, height)
                del kept[item_id]
                dirty = True
        if dirty:
            self._rewrite(list(kept.values()))
        return {item_id for item_id in kept if item_id in wanted}

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.part")
        try:
            with open(temporary, "x", encoding="utf-8") as stream:
                stream.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _sync(self.folder)

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one line and sync it to disk (one write: a crash leaves at most a half line, dropped on reading)."""
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")
            stream.flush()
            os.fsync(stream.fileno())


def output_folder(out_dir: str | os.PathLike[str]) -> Path:
    """The output folder, created if needed, after checking that it can be one (``~`` is the home folder)."""
    # Expanded here, where the folder enters, so that the CLI (a quoted '~/d', --out=~/d) and library callers
    # never get a folder named "~" in the working folder.
    folder = Path(out_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InvalidRequestError(f"{str(folder)!r} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise InvalidRequestError(f"output folder {str(folder)!r} is not writable")
    return folder


def prepare(
    out_dir: str | os.PathLike[str], items: Sequence[BatchItem], *, overwrite: bool = False
) -> tuple[Manifest, list[BatchItem]]:
    """Create the output folder if needed (``~`` is the home folder), clean its manifest, and return the items
    still to make; with ``overwrite``, images made with other parameters are among them (else
    :class:`~zimage_turbo.errors.BatchConflictError`, see :meth:`Manifest.done`). The caller must hold the
    folder's lock (see :func:`open_output`)."""
    folder = output_folder(out_dir)
    manifest = Manifest(folder)
    done = manifest.done(items, overwrite=overwrite)
    pending = [item for item in items if item.id not in done]
    _remove_partial_images(folder, {item.file for item in pending})
    return manifest, pending


@contextlib.contextmanager
def open_output(
    out_dir: str | os.PathLike[str],
    items: Sequence[BatchItem],
    *,
    overwrite: bool = False,
    wait: bool | float = False,
) -> Iterator[tuple[Manifest, list[BatchItem]]]:
    """The output folder's manifest and the items still to make (see :func:`prepare`), with the folder locked
    against other batch runs until the block ends (see :func:`~zimage_turbo.batch_lock.lock_folder`)."""
    lock_timeout(wait)  # a bad value is refused before the folder is created
    folder = output_folder(out_dir)
    with lock_folder(folder, wait=wait):
        yield prepare(folder, items, overwrite=overwrite)


def _differences(row: Mapping[str, Any], item: BatchItem) -> list[str]:
    """What a manifest line says about its image that ``item`` does not ask for (empty: the same image)."""
    asked = row.get("requested")
    size = asked if isinstance(asked, dict) else row
    found = {key: (size if key in ("width", "height") else row).get(key) for key in _IDENTITY}
    found["loras"] = dict(found["loras"] or {})  # lines written before LoRAs existed made images without
    wanted = {key: dict(item.loras) if key == "loras" else getattr(item, key) for key in _IDENTITY}
    return [
        key if key == "prompt" else f"{key} {found[key]} -> {wanted[key]}"
        for key in _IDENTITY
        if found[key] != wanted[key]
    ]


def _conflict(folder: Path, ids: list[str], differences: Mapping[str, str]) -> BatchConflictError:
    shown = ", ".join(f"{item_id} ({differences[item_id]})" for item_id in ids[:_SHOWN])
    more = f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
    return BatchConflictError(
        f"{len(ids)} image(s) in {folder} were made with other parameters than the input now gives them: "
        f"{shown}{more}. Nothing was replaced: pass --overwrite (overwrite=True) to make them again, or use "
        "another output folder",
        folder=str(folder),
        ids=ids,
    )


def image_is_whole(path: Path, width: int, height: int) -> bool:
    """Whether ``path`` can stand for a finished image of this size: a non-empty PNG whose chunks all pass
    their checksums (Pillow's ``verify()``, which reads the file but decodes no pixels) and whose header gives
    ``width`` x ``height``. Images are written atomically, but a file can still be cut short or replaced
    later (a full disk, an interrupted copy, an edit by hand), and the manifest line would then be trusted."""
    try:
        if path.stat().st_size == 0:
            return False
        with Image.open(path, formats=["PNG"]) as image:
            size: tuple[int, int] = image.size
            image.verify()
    # Pillow reports a broken file as OSError, SyntaxError, ValueError, EOFError...: any failure means "not whole".
    except Exception as exc:
        logger.debug("%s: %s", path, exc)
        return False
    return size == (width, height)


def _remove_partial_images(folder: Path, files: set[str]) -> None:
    """Delete the temporary files that a killed run left while writing these images (``.<file>.<hex>.part``)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(".") and name.endswith(".part") and name[1:].rsplit(".", 2)[0] in files:
                Path(entry.path).unlink(missing_ok=True)


def _sync(path: Path) -> None:
    """Flush a file's (or a folder's) data to disk. Folders cannot be opened on Windows: skipped there."""
    if path.is_dir() and os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as exc:  # some filesystems refuse fsync on folders; the data is still written
        logger.debug("fsync %s: %s", path, exc)
    finally:
        os.close(descriptor)
