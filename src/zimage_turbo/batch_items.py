"""The lines of a batch: a JSONL prompt file (or prompts in memory) read into checked :class:`BatchItem` objects.

The format and its rules (ids, derived seeds, defaults) are described in :mod:`zimage_turbo.batch`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .errors import InvalidImageError, InvalidRequestError
from .request import DEFAULT_STEPS, GenerationRequest, check_seed
from .task_inputs import DEFAULT_CONTROL_SCALE, TaskInputs, task_inputs

__all__ = [
    "BatchItem",
    "Prompts",
    "check_id",
    "check_items",
    "derive_seed",
    "items_from",
    "load_items",
    "read_prompts",
]

_FIELDS = ("prompt", "id", "seed", "width", "height", "steps", "image", "mask", "strength", "control", "control_scale")
# the fields of image-to-image, inpainting and ControlNet lines (paths relative to the prompt file's folder)
_INPUT_FIELDS = ("image", "mask", "strength", "control", "control_scale")
# Ids name files: no separators, no leading dot (hidden files, "..").
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# Derived seeds stay below 2**63: the noise of seed s is drawn from torch.Generator().manual_seed(s).
_DERIVED_SEED_LIMIT = 2**63


@dataclass(frozen=True)
class BatchItem:
    """One line of a batch: what to generate and under which name.

    ``image`` (and ``mask``, for inpainting) are the input images' files, as absolute paths once read;
    ``strength`` is the line's, or the task's default; all three are None for text-to-image. ``control`` is a
    ControlNet line's control image (a path, likewise) and ``control_scale`` its scale, or the default (None
    without a control image; such a line's ``strength`` is None too).
    """

    id: str
    prompt: str
    seed: int
    width: int = 1024
    height: int = 1024
    steps: int = DEFAULT_STEPS
    line: int = 0  # where it came from (1-based line of the input file, or position in a list)
    # the LoRAs the batch runs with, (name, scale) in loading order: part of what makes the image
    loras: tuple[tuple[str, float], ...] = ()
    image: str | None = None
    mask: str | None = None
    strength: float | None = None
    control: str | None = None
    control_scale: float | None = None

    @property
    def file(self) -> str:
        """The image's file name in the output folder."""
        return f"{self.id}.png"

    def inputs(self) -> TaskInputs | None:
        """The line's input images, checked by their headers (decoded when the line's turn comes)."""
        scale = DEFAULT_CONTROL_SCALE if self.control_scale is None else self.control_scale
        return task_inputs(self.image, self.mask, self.strength, self.control, scale, decode=False)

    def request(self) -> GenerationRequest:
        return GenerationRequest(
            self.prompt,
            height=self.height,
            width=self.width,
            steps=self.steps,
            seed=self.seed,
            inputs=self.inputs(),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> BatchItem:
        fields = json.loads(text)
        fields["loras"] = tuple((str(name), float(scale)) for name, scale in fields.get("loras", ()))
        return cls(**fields)


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
    """Read and check a JSONL prompt file (``~`` is the home folder); errors name the file and line."""
    source = Path(path).expanduser()
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequestError(f"cannot read the prompt file {str(source)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    records: list[tuple[int, str, object]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, f"{source}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{source}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return _items(records, "line", seed=seed, width=width, height=height, steps=steps, folder=source.parent)


def items_from(
    prompts: Iterable[str | Mapping[str, Any]],
    *,
    seed: int = 0,
    width: int = 1024,
    height: int = 1024,
    steps: int = DEFAULT_STEPS,
) -> list[BatchItem]:
    """Batch items from prompts in memory: plain strings, or mappings shaped like the JSONL lines (their input
    images' paths relative to the current folder)."""
    records = [
        (number, f"prompt {number}", {"prompt": p} if isinstance(p, str) else p)
        for number, p in enumerate(prompts, start=1)
    ]
    return _items(records, "prompt", seed=seed, width=width, height=height, steps=steps)


def check_items(items: Sequence[BatchItem]) -> list[BatchItem]:
    """Ready-made items, checked by the code that checks JSONL lines: an id names a file in the output folder,
    so one made by hand (``BatchItem("../x", ...)``, an id used twice) must be refused like a line would be,
    before anything is written. Errors name the item's position and id."""
    records = [
        (
            number,
            f"item {number} (id {item.id!r})",
            # a text-to-image item's input fields are None: left out, as a line leaves them out
            {f: getattr(item, f) for f in _FIELDS if f not in _INPUT_FIELDS or getattr(item, f) is not None},
        )
        for number, item in enumerate(items, start=1)
    ]
    checked = _items(records, "item")
    return [replace(new, line=item.line) for new, item in zip(checked, items, strict=True)]


def check_id(item_id: object, place: str) -> str:
    """The one rule for ids, wherever an item comes from (a line, a mapping, a ``BatchItem``, a Ray actor's
    JSON): ``<id>.png`` must be a plain file name inside the output folder."""
    if not isinstance(item_id, str) or not _ID.fullmatch(item_id):
        raise InvalidRequestError(
            f"{place}: id must be 1 to 128 letters, digits, '.', '_' or '-' (not starting with '.' or '-'), "
            f"got {item_id!r}"
        )
    return item_id


def _items(
    records: Sequence[tuple[int, str, object]],
    unit: str,
    *,
    seed: int = 0,
    width: int = 1024,
    height: int = 1024,
    steps: int = DEFAULT_STEPS,
    folder: Path | None = None,
) -> list[BatchItem]:
    """``records``: (number, where it is for messages, the line's object); ``unit``: what a number counts;
    ``folder``: where relative paths of input images start (None: the current folder)."""
    base = check_seed(seed)
    GenerationRequest("defaults", height=height, width=width, steps=steps)  # the defaults themselves must be valid
    items: list[BatchItem] = []
    # Keyed by the lower-case id: on case-insensitive filesystems (macOS, Windows, shares they export) Fox.png
    # and fox.png are one file, and one image would replace the other while the manifest listed both.
    first_of: dict[str, tuple[int, str]] = {}
    for number, place, record in records:
        item = _item(record, number, place, base=base, width=width, height=height, steps=steps, folder=folder)
        key = item.id.lower()
        if key in first_of:
            first, other = first_of[key]
            if other == item.id:
                raise InvalidRequestError(f"{place}: id {item.id!r} is also used at {unit} {first}")
            raise InvalidRequestError(
                f"{place}: id {item.id!r} names the same file as id {other!r} at {unit} {first} on "
                "case-insensitive filesystems (macOS, Windows); ids must differ in more than case"
            )
        first_of[key] = (number, item.id)
        items.append(item)
    return items


def _item(
    record: object, number: int, place: str, *, base: int, width: int, height: int, steps: int, folder: Path | None
) -> BatchItem:
    if not isinstance(record, Mapping):
        raise InvalidRequestError(f'{place}: expected an object like {{"prompt": "..."}}, got {type(record).__name__}')
    unknown = sorted(set(record) - set(_FIELDS))
    if unknown:
        raise InvalidRequestError(
            f"{place}: unknown field(s) {', '.join(map(str, unknown))}; known: {', '.join(_FIELDS)}"
        )
    if "prompt" not in record:
        raise InvalidRequestError(f"{place}: no prompt")
    item_id = check_id(record.get("id", f"{number:06d}"), place)
    try:
        inputs = _line_inputs(record, folder)
        if inputs is not None:  # a line with an input image takes the image's size by default
            height, width = inputs.output_size(record.get("height"), record.get("width"))
        request = GenerationRequest(
            prompt=record["prompt"],
            width=record.get("width", width),
            height=record.get("height", height),
            steps=record.get("steps", steps),
            # A seed that is given must be one (null included: GenerationRequest would take None as "random").
            seed=check_seed(record["seed"]) if "seed" in record else derive_seed(base, item_id),
            inputs=inputs,
        )
    except InvalidImageError as exc:
        raise InvalidImageError(f"{place}: {exc}", argument=exc.argument) from None
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{place}: {exc}") from None
    assert request.seed is not None
    given: dict[str, Any] = {}
    if inputs is not None and inputs.control is not None:
        given = {"control": _text(inputs.control.path), "control_scale": inputs.control_scale}
    elif inputs is not None:
        given = {"strength": inputs.strength}
    if inputs is not None and inputs.image is not None:
        given["image"] = _text(inputs.image.path)
    if inputs is not None and inputs.mask is not None:
        given["mask"] = _text(inputs.mask.path)
    return BatchItem(
        item_id, request.prompt, request.seed, request.width, request.height, request.steps, number, **given
    )


def _line_inputs(record: Mapping[str, Any], folder: Path | None) -> TaskInputs | None:
    """The input images a line names (``image``, ``mask``, ``control``: paths, relative to ``folder``), its strength
    and its control scale."""
    paths = {}
    for field in ("image", "mask", "control"):
        value = record.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidRequestError(f"{field} must be a path (a string), got {type(value).__name__}")
        path = Path(value).expanduser()
        paths[field] = path if path.is_absolute() or folder is None else folder / path
    scale = record.get("control_scale", DEFAULT_CONTROL_SCALE)
    return task_inputs(
        paths.get("image"), paths.get("mask"), record.get("strength"), paths.get("control"), scale, decode=False
    )


def _text(path: Path | None) -> str:
    assert path is not None
    return str(path.absolute())


Prompts = str | os.PathLike[str] | Sequence[str | Mapping[str, Any]] | Sequence[BatchItem]


def load_items(
    prompts: Prompts, *, seed: int = 0, width: int = 1024, height: int = 1024, steps: int = DEFAULT_STEPS
) -> list[BatchItem]:
    """Batch items from a JSONL file, a list of prompts or line-shaped mappings, or ready items (checked)."""
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts, seed=seed, width=width, height=height, steps=steps)
    listed = list(prompts)
    ready = [p for p in listed if isinstance(p, BatchItem)]
    plain = [p for p in listed if not isinstance(p, BatchItem)]
    if ready and plain:
        raise InvalidRequestError("give either BatchItem objects or prompts, not a mix of both")
    return check_items(ready) if ready else items_from(plain, seed=seed, width=width, height=height, steps=steps)
