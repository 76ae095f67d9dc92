"""Many prompts to a folder of PNG files and a JSONL manifest, resumable after any interruption.

The input has one JSON object per line (blank lines are skipped)::

    {"prompt": "a red fox in the snow"}
    {"prompt": "a lighthouse at dusk", "id": "lighthouse", "seed": 7, "width": 1280, "height": 768, "steps": 8}

``prompt`` is required. ``id`` (letters, digits, ``.``, ``_``, ``-``) names the image file ``<id>.png``; it
defaults to the line number (``000002``). ``seed`` defaults to one derived from the base seed and the id, so the
same line always gives the same image, whichever machine or replica makes it and whatever else the file holds.
``width``, ``height`` and ``steps`` default to the batch's options.

The output folder gets ``<id>.png`` per line and ``manifest.jsonl``, one line per image written: id, prompt,
seed, file, size, steps, strategy, device, timings, fallbacks, warnings. Each image is written atomically and
synced to disk before its manifest line is appended (and synced), so an interruption at any moment leaves at
worst an image without a line, never a line without its image. Running the same batch again skips every line
whose image and manifest line both exist (with the same prompt, seed, size and steps) and makes the rest;
manifest lines left half-written by a crash, or whose image has gone, are dropped first. Every image is
therefore listed exactly once, and identical to what an uninterrupted run makes.

:func:`run_batch` runs on this machine (a :class:`~zimage_turbo.pool.GeneratorPool`: one replica per GPU);
:func:`zimage_turbo.ray_batch.run_batch_ray` spreads the same work over a Ray cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidRequestError, first_line
from .pool import GeneratorPool, PromptFailure
from .request import DEFAULT_STEPS, GenerationRequest, check_seed
from .result import GenerationResult, save_image_atomically
from .settings import ZImageSettings

__all__ = [
    "MANIFEST_NAME",
    "BatchItem",
    "BatchReport",
    "Manifest",
    "derive_seed",
    "items_from",
    "load_items",
    "manifest_row",
    "prepare",
    "read_prompts",
    "run_batch",
    "write_image",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
_FIELDS = ("prompt", "id", "seed", "width", "height", "steps")
# Ids name files: no separators, no leading dot (hidden files, "..").
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# What must match between a manifest line and an input line for the image to count as done.
_IDENTITY = ("prompt", "seed", "width", "height", "steps", "file")
# Derived seeds stay below 2**63: the noise of seed s is drawn from torch.Generator().manual_seed(s).
_DERIVED_SEED_LIMIT = 2**63


@dataclass(frozen=True)
class BatchItem:
    """One line of a batch: what to generate and under which name."""

    id: str
    prompt: str
    seed: int
    width: int = 1024
    height: int = 1024
    steps: int = DEFAULT_STEPS
    line: int = 0  # where it came from (1-based line of the input file, or position in a list)

    @property
    def file(self) -> str:
        """The image's file name in the output folder."""
        return f"{self.id}.png"

    def request(self) -> GenerationRequest:
        return GenerationRequest(self.prompt, height=self.height, width=self.width, steps=self.steps, seed=self.seed)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> BatchItem:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class BatchReport:
    """What a batch run did.

    Attributes:
        total: lines in the input.
        skipped: lines already done by an earlier run (image and manifest line present).
        generated: images made by this run.
        failed: ``(id, error)`` of each line that raised; rerunning the batch retries them.
        manifest: the manifest file.
        seconds: wall-clock time of the run.
    """

    total: int
    skipped: int
    generated: int
    failed: tuple[tuple[str, str], ...]
    manifest: Path
    seconds: float
    devices: tuple[str, ...] = field(default_factory=tuple)

    @property
    def complete(self) -> bool:
        """Every line has its image."""
        return self.skipped + self.generated == self.total

    def describe(self) -> str:
        lines = [
            f"{self.generated} generated, {self.skipped} already done, {len(self.failed)} failed "
            f"({self.total} in all) in {self.seconds:.1f} s; manifest: {self.manifest}"
        ]
        lines += [f"  failed {item}: {error}" for item, error in self.failed]
        return "\n".join(lines)


def derive_seed(base: int, item_id: str) -> int:
    """The seed of a line without one: a hash of the base seed and the line's id (stable across runs, machines
    and Python versions, unlike ``hash()``)."""
    digest = hashlib.sha256(f"{base}\x00{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _DERIVED_SEED_LIMIT


def read_prompts(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    width: int = 1024,
    height: int = 1024,
    steps: int = DEFAULT_STEPS,
) -> list[BatchItem]:
    """Read and check a JSONL prompt file; errors name the file and line."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequestError(f"cannot read the prompt file {str(source)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    records: list[tuple[int, object]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{source}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return _items(records, str(source), seed=seed, width=width, height=height, steps=steps)


def items_from(
    prompts: Iterable[str | Mapping[str, Any]],
    *,
    seed: int = 0,
    width: int = 1024,
    height: int = 1024,
    steps: int = DEFAULT_STEPS,
) -> list[BatchItem]:
    """Batch items from prompts in memory: plain strings, or mappings shaped like the JSONL lines."""
    records = [(number, {"prompt": p} if isinstance(p, str) else p) for number, p in enumerate(prompts, start=1)]
    return _items(records, "prompt", seed=seed, width=width, height=height, steps=steps)


def _items(
    records: Sequence[tuple[int, object]], where: str, *, seed: int, width: int, height: int, steps: int
) -> list[BatchItem]:
    base = check_seed(seed)
    GenerationRequest("defaults", height=height, width=width, steps=steps)  # the defaults themselves must be valid
    items: list[BatchItem] = []
    first_line_of: dict[str, int] = {}
    for number, record in records:
        place = f"{where}:{number}" if where != "prompt" else f"prompt {number}"
        item = _item(record, number, place, base=base, width=width, height=height, steps=steps)
        if item.id in first_line_of:
            raise InvalidRequestError(f"{place}: id {item.id!r} is also used at line {first_line_of[item.id]}")
        first_line_of[item.id] = number
        items.append(item)
    return items


def _item(record: object, number: int, place: str, *, base: int, width: int, height: int, steps: int) -> BatchItem:
    if not isinstance(record, Mapping):
        raise InvalidRequestError(f'{place}: expected an object like {{"prompt": "..."}}, got {type(record).__name__}')
    unknown = sorted(set(record) - set(_FIELDS))
    if unknown:
        raise InvalidRequestError(
            f"{place}: unknown field(s) {', '.join(map(str, unknown))}; known: {', '.join(_FIELDS)}"
        )
    if "prompt" not in record:
        raise InvalidRequestError(f"{place}: no prompt")
    item_id = record.get("id", f"{number:06d}")
    if not isinstance(item_id, str) or not _ID.fullmatch(item_id):
        raise InvalidRequestError(
            f"{place}: id must be 1 to 128 letters, digits, '.', '_' or '-' (not starting with '.' or '-'), "
            f"got {item_id!r}"
        )
    try:
        request = GenerationRequest(
            prompt=record["prompt"],
            width=record.get("width", width),
            height=record.get("height", height),
            steps=record.get("steps", steps),
            seed=record["seed"] if "seed" in record else derive_seed(base, item_id),
        )
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{place}: {exc}") from None
    assert request.seed is not None
    return BatchItem(item_id, request.prompt, request.seed, request.width, request.height, request.steps, number)


# -- output ------------------------------------------------------------------------------------------------------


def write_image(folder: Path, item: BatchItem, result: GenerationResult) -> Path:
    """Write ``item``'s image atomically and make sure it is on disk (before its manifest line may be)."""
    path = folder / item.file
    save_image_atomically(result.image, path)
    _sync(path)
    _sync(folder)  # the rename itself
    return path


def manifest_row(item: BatchItem, result: GenerationResult, **extra: Any) -> dict[str, Any]:
    """The manifest line of one image."""
    timings = result.timings
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
        "timings": {
            "load": timings.load,
            "encode": timings.encode,
            "denoise": timings.denoise,
            "decode": timings.decode,
            "recovery": timings.recovery,
            "total": timings.total,
        },
        "fallbacks": [str(f) for f in result.fallbacks],
        "warnings": list(result.warnings),
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

    def done(self, items: Sequence[BatchItem]) -> set[str]:
        """Ids of ``items`` whose image and matching manifest line exist. First the manifest is made clean:
        unreadable lines, lines whose image is missing and lines that disagree with ``items`` (an id now
        with another prompt, seed or size) are dropped, and for an id listed twice only the last line stays,
        so that rerunning never lists an image twice."""
        wanted = {item.id: item for item in items}
        rows, dirty = self._read()
        kept: dict[str, dict[str, Any]] = {}
        for row in rows:
            item = wanted.get(row["id"])
            stale = item is not None and any(row.get(key) != getattr(item, key) for key in _IDENTITY)
            if stale or not (self.folder / row["file"]).is_file():
                dirty = True
                continue
            if row["id"] in kept:
                dirty = True
            kept[row["id"]] = row
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


def prepare(out_dir: str | os.PathLike[str], items: Sequence[BatchItem]) -> tuple[Manifest, list[BatchItem]]:
    """Create the output folder if needed, clean its manifest, and return the items still to make."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise InvalidRequestError(f"{str(folder)!r} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise InvalidRequestError(f"output folder {str(folder)!r} is not writable")
    manifest = Manifest(folder)
    done = manifest.done(items)
    pending = [item for item in items if item.id not in done]
    _remove_partial_images(folder, {item.file for item in pending})
    return manifest, pending


def _remove_partial_images(folder: Path, files: set[str]) -> None:
    """Delete the temporary files that a killed run left while writing these images (``.<file>.<hex>.part``)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(".") and name.endswith(".part") and name[1:].rsplit(".", 2)[0] in files:
                Path(entry.path).unlink(missing_ok=True)


# -- the local runner --------------------------------------------------------------------------------------------

Prompts = str | os.PathLike[str] | Sequence[str | Mapping[str, Any]] | Sequence[BatchItem]


def load_items(
    prompts: Prompts, *, seed: int = 0, width: int = 1024, height: int = 1024, steps: int = DEFAULT_STEPS
) -> list[BatchItem]:
    """Batch items from a JSONL file, a list of prompts or line-shaped mappings, or ready items (kept as they are)."""
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts, seed=seed, width=width, height=height, steps=steps)
    listed = list(prompts)
    ready = [p for p in listed if isinstance(p, BatchItem)]
    plain = [p for p in listed if not isinstance(p, BatchItem)]
    if ready and plain:
        raise InvalidRequestError("give either BatchItem objects or prompts, not a mix of both")
    return ready or items_from(plain, seed=seed, width=width, height=height, steps=steps)


def run_batch(
    prompts: Prompts,
    out_dir: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    settings: ZImageSettings | None = None,
    devices: str | Sequence[str | torch.device] = "all",
    seed: int = 0,
    width: int = 1024,
    height: int = 1024,
    steps: int = DEFAULT_STEPS,
    pool: GeneratorPool | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> BatchReport:
    """Make every image of a batch that is not made yet, on this machine.

    Args:
        prompts: a JSONL file (see the module docs), or a list of prompts or of line-shaped mappings.
        out_dir: the output folder (created if needed); rerunning into the same folder resumes.
        model, settings: as for :class:`~zimage_turbo.generator.Generator`.
        devices: as for :class:`~zimage_turbo.pool.GeneratorPool` (``"all"``: a replica per GPU that holds
            the model; on a machine without one, a single replica).
        seed: the base seed of lines without a seed.
        width, height, steps: defaults for lines that do not set them.
        pool: an existing :class:`~zimage_turbo.pool.GeneratorPool` to use (left open) instead of a new one.
        on_row: called with each manifest line once it is on disk (progress reports; raising stops the batch).

    Every line is checked before anything loads. Lines that fail are reported in the result (and retried by
    the next run); the others are unaffected.
    """
    started = time.perf_counter()
    items = load_items(prompts, seed=seed, width=width, height=height, steps=steps)
    manifest, pending = prepare(out_dir, items)
    skipped = len(items) - len(pending)
    failed: list[tuple[str, str]] = []
    generated = 0
    used: tuple[str, ...] = ()
    if pending:
        own = pool is None
        workers = GeneratorPool(model, settings=settings, devices=devices) if pool is None else pool
        try:
            used = workers.devices
            outcomes = workers.generate_requests([item.request() for item in pending])
            # Closing the outcomes on an interruption cancels the images not started yet.
            with contextlib.closing(outcomes), _progress(len(pending), enabled=workers.settings.progress) as bar:
                for index, outcome in outcomes:
                    item = pending[index]
                    if isinstance(outcome, PromptFailure):
                        failed.append((item.id, f"{type(outcome.error).__name__}: {first_line(outcome.error)}"))
                    else:
                        write_image(manifest.folder, item, outcome)
                        row = manifest_row(item, outcome)
                        manifest.append(row)
                        generated += 1
                        if on_row is not None:
                            on_row(row)
                    bar.update(1)
        finally:
            if own:
                workers.close()
    report = BatchReport(
        len(items), skipped, generated, tuple(failed), manifest.path, time.perf_counter() - started, used
    )
    logger.info("%s", report.describe())
    return report


def _progress(total: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="images", unit="image", disable=not enabled)


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
