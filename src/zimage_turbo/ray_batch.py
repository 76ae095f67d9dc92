"""The batch of :mod:`zimage_turbo.batch` spread over a Ray cluster: one Generator per Ray actor.

    pip install "zimage-turbo[ray]"

    >>> from zimage_turbo.ray_batch import run_batch_ray
    >>> run_batch_ray("prompts.jsonl", "/shared/out", address="ray://head:10001")  # doctest: +SKIP

The pending lines become a Ray Dataset; ``map_batches`` sends them to a fixed pool of actors, each holding one
loaded :class:`~zimage_turbo.generator.Generator` (one GPU each when the cluster has GPUs: Ray gives every actor
its own card through ``CUDA_VISIBLE_DEVICES``). An actor writes each image into the output folder and returns
its manifest line; this process (the driver) appends the lines as they come back. The same code runs on a
local Ray (``address=None``: ``ray.init()`` starts one) and on a cluster.

Assumptions, on a cluster: the output folder is on a filesystem every node shares (NFS, a mounted bucket...), at
the same path; the model folder (or the Hugging Face cache it is found in) is readable at the same path on every
node; every node has this package installed (or pass a Ray ``runtime_env``). The manifest, resume and seed rules
are those of :mod:`zimage_turbo.batch`, so a batch started on one machine can be finished on a cluster and
the other way round.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .batch import BatchReport
from .batch_folder import Manifest, manifest_row, open_output, write_image
from .batch_items import BatchItem, Prompts, load_items
from .errors import ZImageError, first_line
from .request import DEFAULT_STEPS
from .settings import ZImageSettings

__all__ = ["ReplicaActor", "run_batch_ray"]

logger = logging.getLogger(__name__)


class ReplicaActor:
    """A Ray Data callable class: loads one Generator when the actor starts, then turns batches of pending items
    into images in ``out_dir`` and returns their manifest lines (``row``) or errors (``error``), by ``id``."""

    def __init__(self, settings: Mapping[str, Any], out_dir: str) -> None:
        from .generator import Generator

        # Many actors share one console: no progress bars from them.
        self.generator = Generator(settings=ZImageSettings(**{**settings, "progress": False}), load=True)
        self.out_dir = Path(out_dir)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
        ids: list[str] = []
        rows: list[str] = []
        errors: list[str] = []
        for text in batch["item"]:
            item = BatchItem.from_json(str(text))
            ids.append(item.id)
            try:
                inputs = item.inputs()  # its files, checked again (an actor gets the line as JSON)
                result = self.generator.generate(
                    item.prompt,
                    height=item.height,
                    width=item.width,
                    steps=item.steps,
                    seed=item.seed,
                    **(inputs.arguments() if inputs is not None else {}),
                )
                write_image(self.out_dir, item, result)
                rows.append(json.dumps(manifest_row(item, result, worker=_worker()), ensure_ascii=False))
                errors.append("")
            except Exception as exc:
                # One failing line must not take the actor (and the batch) down with it.
                logger.warning("%s failed: %s", item.id, first_line(exc))
                rows.append("")
                errors.append(f"{type(exc).__name__}: {first_line(exc)}")
        return {"id": ids, "row": rows, "error": errors}


def run_batch_ray(
    prompts: Prompts,
    out_dir: str | os.PathLike[str],
    *,
    address: str | None = None,
    model: str | os.PathLike[str] | None = None,
    settings: ZImageSettings | None = None,
    seed: int = 0,
    width: int = 1024,
    height: int = 1024,
    steps: int = DEFAULT_STEPS,
    replicas: int | None = None,
    gpus_per_replica: float | None = None,
    cpus_per_replica: float = 1.0,
    batch_size: int = 1,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
    wait: bool | float = False,
) -> BatchReport:
    """Make every image of a batch not made yet, with Ray Data over a pool of Generator actors.

    Args:
        prompts, out_dir, model, settings, seed, width, height, steps, on_row, overwrite, wait: as for
            :func:`zimage_turbo.batch.run_batch`.
        address: the Ray cluster to join (``"auto"``, ``"ray://head:10001"``...); None starts a local Ray. Ignored
            when Ray is already initialized in this process (that session is used, and left running).
        replicas: how many actors; default one per GPU of the cluster (at most one per pending line), or one
            when it has no GPU (each CPU replica holds the whole model in RAM).
        gpus_per_replica: GPUs reserved per actor; default 1 when the cluster has GPUs, else 0 (CPU actors).
        cpus_per_replica: CPUs reserved per actor.
        batch_size: lines per call of an actor (1: a slow line never holds others back).
    """
    started = time.perf_counter()
    base = settings if settings is not None else ZImageSettings()
    if model is not None:
        base = base.replace(model=os.fspath(model))
    items = load_items(prompts, seed=seed, width=width, height=height, steps=steps)
    generated = 0
    failed: list[tuple[str, str]] = []
    # The driver holds the folder's lock while the actors write into it.
    with open_output(out_dir, items, overwrite=overwrite, wait=wait) as (manifest, pending):
        if pending:
            ray = _import_ray()
            own = not ray.is_initialized()
            if own:
                # A local Ray needs no dashboard; options for starting one are not for joining a cluster.
                local = {"include_dashboard": False} if address is None else {}
                ray.init(address=address, configure_logging=False, **local)
            try:
                generated, failed = _make(
                    ray,
                    manifest,
                    pending,
                    base,
                    on_row,
                    replicas=replicas,
                    gpus_per_replica=gpus_per_replica,
                    cpus_per_replica=cpus_per_replica,
                    batch_size=batch_size,
                )
            finally:
                if own:
                    ray.shutdown()
    skipped = len(items) - len(pending)
    report = BatchReport(len(items), skipped, generated, tuple(failed), manifest.path, time.perf_counter() - started)
    # The caller gets the report (the CLI prints it); at INFO a terminal would show it twice.
    logger.debug("%s", report.describe())
    return report


def _make(
    ray: Any,
    manifest: Manifest,
    pending: Sequence[BatchItem],
    settings: ZImageSettings,
    on_row: Callable[[dict[str, Any]], None] | None,
    *,
    replicas: int | None,
    gpus_per_replica: float | None,
    cpus_per_replica: float,
    batch_size: int,
) -> tuple[int, list[tuple[str, str]]]:
    """Make the pending images on Ray actors; (how many were written, (id, error) of each that failed)."""
    generated = 0
    failed: list[tuple[str, str]] = []
    gpus, actors = _resources(ray, gpus_per_replica, replicas, len(pending))
    logger.info("%d pending image(s) on %d Ray actor(s), %g GPU each", len(pending), actors, gpus)
    dataset = ray.data.from_items([{"item": item.to_json()} for item in pending], override_num_blocks=len(pending))
    images = dataset.map_batches(
        ReplicaActor,
        fn_constructor_kwargs={"settings": settings.model_dump(mode="json"), "out_dir": str(manifest.folder.resolve())},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus,
        num_cpus=cpus_per_replica,
    )
    rows = images.iter_rows()
    try:
        for output in rows:
            if output["error"]:
                failed.append((str(output["id"]), str(output["error"])))
                continue
            row = json.loads(output["row"])
            manifest.append(row)  # the actor has written and synced the image already
            generated += 1
            if on_row is not None:
                on_row(row)
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # stops the actors when the loop ends early, so that the next batch finds free slots
    return generated, failed


def _resources(ray: Any, gpus_per_replica: float | None, replicas: int | None, pending: int) -> tuple[float, int]:
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    gpus = gpus_per_replica if gpus_per_replica is not None else (1.0 if cluster_gpus else 0.0)
    if replicas is None:
        replicas = int(cluster_gpus // gpus) if gpus else 1
    if replicas < 1:
        raise ZImageError(
            f"no Ray actor fits: {gpus:g} GPU per replica, {cluster_gpus:g} GPU(s) in the cluster; "
            "pass replicas= or gpus_per_replica="
        )
    return gpus, max(1, min(replicas, pending))


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ZImageError(f'Ray is not installed ({exc}); install it with: pip install "zimage-turbo[ray]"') from None
    return ray


def _worker() -> str:
    """Which node and GPU made an image, for the manifest."""
    import socket

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return f"{socket.gethostname()}" + (f" gpu {visible}" if visible else "")
