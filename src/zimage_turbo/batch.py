"""Many prompts to a folder of PNG files and a JSONL manifest, resumable after any interruption.

The input has one JSON object per line (blank lines are skipped)::

    {"prompt": "a red fox in the snow"}
    {"prompt": "a lighthouse at dusk", "id": "lighthouse", "seed": 7, "width": 1280, "height": 768, "steps": 8}
    {"prompt": "the same harbour in winter", "image": "photos/harbour.png", "strength": 0.5}
    {"prompt": "a lighthouse in the same pose", "control": "edges/lighthouse.png", "control_scale": 0.6}

``prompt`` is required. ``id`` (letters, digits, ``.``, ``_``, ``-``; unique, also ignoring case) names the image
file ``<id>.png``; it defaults to the line number (``000002``). ``seed`` defaults to one derived from the base seed
and the id, so the same line always gives the same image, whichever machine or replica makes it and whatever
else the file holds. ``width``, ``height`` and ``steps`` default to the batch's options. ``image`` makes the line
image-to-image, with ``mask`` inpainting (paths relative to the prompt file's folder; ``strength`` as for
:meth:`~zimage_turbo.Generator.generate`); such a line's size defaults to its image's. ``control`` (a path, likewise)
conditions the line on the ControlNet of the ``controlnet`` setting, at ``control_scale`` (with ``image`` and
``mask``: ControlNet inpainting). Ready-made
:class:`BatchItem` objects are checked by the same rules.

The output folder gets ``<id>.png`` per line and ``manifest.jsonl``, one line per image written: id, prompt,
seed, file, size, steps, strategy, device, timings, fallbacks, warnings. Each image is written atomically and
synced to disk before its manifest line is appended (and synced), so an interruption at any moment leaves at
worst an image without a line, never a line without its image. Running the same batch again skips every line
whose image and manifest line both exist (with the same prompt, seed, size and steps, and an image that is a
whole PNG of that size) and makes the rest; manifest lines left half-written by a crash, or whose image has
gone or is damaged, are dropped first. An image made with other parameters than the input now gives its id is
not replaced unless ``overwrite=True`` (:class:`~zimage_turbo.errors.BatchConflictError`). One run at a time
holds the folder (a lock file, ``.zimage-batch.lock``; another run raises
:class:`~zimage_turbo.errors.BatchLockedError`, or waits with ``wait=True``). Every image is therefore listed
exactly once, and identical to what an uninterrupted run makes.

:func:`run_batch` runs on this machine (a :class:`~zimage_turbo.pool.GeneratorPool`: one replica per GPU);
:func:`zimage_turbo.ray_batch.run_batch_ray` spreads the same work over a Ray cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .batch_folder import MANIFEST_NAME, Manifest, manifest_row, open_output, prepare, write_image
from .batch_items import BatchItem, Prompts, derive_seed, items_from, load_items, read_prompts
from .errors import first_line
from .loras import read_lora_source
from .pool import GeneratorPool, PromptFailure
from .request import DEFAULT_STEPS
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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, as printed by ``zimage-turbo batch --json``."""
        return {
            "total": self.total,
            "skipped": self.skipped,
            "generated": self.generated,
            "failed": [{"id": item, "error": error} for item, error in self.failed],
            "complete": self.complete,
            "manifest": str(self.manifest),
            "seconds": self.seconds,
            "devices": list(self.devices),
        }

    def describe(self) -> str:
        lines = [
            f"{self.generated} generated, {self.skipped} already done, {len(self.failed)} failed "
            f"({self.total} in all) in {self.seconds:.1f} s; manifest: {self.manifest}"
        ]
        lines += [f"  failed {item}: {error}" for item, error in self.failed]
        return "\n".join(lines)


# -- the local runner --------------------------------------------------------------------------------------------


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
    overwrite: bool = False,
    wait: bool | float = False,
    loras: Sequence[tuple[str | os.PathLike[str], float]] = (),
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
        overwrite: make again the images that the folder holds for these ids but with other parameters (a
            prompt, seed, size or steps changed since). Without it they raise
            :class:`~zimage_turbo.errors.BatchConflictError` before anything is written.
        wait: what to do when another batch run uses the folder (it holds ``.zimage-batch.lock``): False
            raises :class:`~zimage_turbo.errors.BatchLockedError` at once, True waits for it to finish, a
            number waits that many seconds at most. The lock is held until this run ends, however it ends.
        loras: ``(source, scale)`` of each LoRA to run with (see :meth:`Generator.load_lora`); they are part of
            what an image is made with, so a rerun with other LoRAs is a conflict like another prompt. Loaded
            into ``pool`` for this run only.

    Every line is checked before anything loads. Lines that fail are reported in the result (and retried by
    the next run); the others are unaffected.
    """
    started = time.perf_counter()
    items = load_items(prompts, seed=seed, width=width, height=height, steps=steps)
    settings = settings if settings is not None else ZImageSettings()
    # every LoRA read and checked before anything loads; the names go into each image's identity
    wanted = [
        read_lora_source(source, scale=scale, name=None, weight_name=None, settings=settings) for source, scale in loras
    ]
    if wanted:
        identity = tuple((lora.name, lora.scale) for lora in wanted)
        items = [replace(item, loras=identity) for item in items]
    generated = 0
    failed: list[tuple[str, str]] = []
    used: tuple[str, ...] = ()
    with open_output(out_dir, items, overwrite=overwrite, wait=wait) as (manifest, pending):
        if pending:
            own = pool is None
            workers = GeneratorPool(model, settings=settings, devices=devices) if pool is None else pool
            try:
                for lora in wanted:
                    workers.load_lora(lora.file.path, scale=lora.scale, name=lora.name)
                used = workers.devices
                generated, failed = _make(workers, manifest, pending, on_row)
            finally:
                if own:
                    workers.close()
                else:
                    for lora in wanted:
                        if lora.name in workers.loras:
                            workers.unload_lora(lora.name)
    skipped = len(items) - len(pending)
    report = BatchReport(
        len(items), skipped, generated, tuple(failed), manifest.path, time.perf_counter() - started, used
    )
    # The caller gets the report (the CLI prints it); at INFO a terminal would show it twice.
    logger.debug("%s", report.describe())
    return report


def _make(
    workers: GeneratorPool,
    manifest: Manifest,
    pending: Sequence[BatchItem],
    on_row: Callable[[dict[str, Any]], None] | None,
) -> tuple[int, list[tuple[str, str]]]:
    """Make the pending images; (how many were written, (id, error) of each that failed)."""
    generated = 0
    failed: list[tuple[str, str]] = []
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
    return generated, failed


def _progress(total: int, *, enabled: bool) -> Any:
    from .progress import tqdm_class

    return tqdm_class()(total=total, desc="images", unit="image", disable=not enabled)
