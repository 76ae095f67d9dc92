"""The Ray path end to end on the tiny checkpoint: a local Ray (one session for the module) with two CPU actors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_turbo import Generator, ZImageSettings
from zimage_turbo.batch import MANIFEST_NAME, BatchItem, items_from, run_batch
from zimage_turbo.batch_lock import LOCK_NAME

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'zimage-turbo[ray]'; the dev extra has it)")

from zimage_turbo.ray_batch import run_batch_ray  # noqa: E402

SMALL = {"width": 256, "height": 256, "steps": 2}
PROMPTS = [f"a tiny oil painting of subject {i}" for i in range(6)]


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    # Two logical CPUs: one per actor. Started by the test, so run_batch_ray uses it and leaves it running.
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def settings(tiny_checkpoint: Path) -> ZImageSettings:
    return ZImageSettings(model=str(tiny_checkpoint), progress=False)


@pytest.fixture(scope="module")
def items() -> list[BatchItem]:
    return items_from(PROMPTS, seed=5, **SMALL)


@pytest.fixture(scope="module")
def reference(settings: ZImageSettings, items: list[BatchItem]) -> dict[str, np.ndarray]:
    """The images of a single Generator on one torch thread. Ray gives each one-CPU actor one thread, and CPU
    rounding depends on the thread count; with the same count the images agree bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Generator(settings=settings) as gen:
            return {item.id: np.asarray(gen.generate(item.prompt, seed=item.seed, **SMALL).image) for item in items}
    finally:
        torch.set_num_threads(threads)


def rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / MANIFEST_NAME).read_text().splitlines()]


def test_ray_batch_interrupted_half_way_then_resumed(
    ray_session: None,
    settings: ZImageSettings,
    items: list[BatchItem],
    reference: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    seen: list[str] = []

    def stop_after_three(row: dict[str, Any]) -> None:
        seen.append(row["id"])
        if len(seen) == 3:
            raise Stop

    with pytest.raises(Stop):
        run_batch_ray(items, out, settings=settings, replicas=2, on_row=stop_after_three)
    assert len(rows(out)) == 3
    # The same Ray session again: the interrupted run's actors were stopped, so the new ones find free CPUs.
    resumed = run_batch_ray(items, out, settings=settings, replicas=2)
    assert (resumed.skipped, resumed.generated, resumed.failed, resumed.complete) == (3, 3, (), True)
    written = rows(out)
    assert sorted(r["id"] for r in written) == [item.id for item in items]  # exactly once each
    assert {r["id"] for r in written[3:]}.isdisjoint(seen)  # nothing done twice
    assert all(r["strategy"] == "cpu" and r["worker"] for r in written)
    # The lock file stays (empty, unlocked: removing it could race with a run taking it); the holder's note goes.
    left = {p.name for p in out.iterdir()} - {LOCK_NAME}
    assert left == {MANIFEST_NAME, *(item.file for item in items)}
    for item in items:
        assert np.array_equal(np.asarray(Image.open(out / item.file)), reference[item.id]), item.id
    # The manifest is the local runner's: a local run into the same folder finds nothing left to do.
    again = run_batch(items, out, settings=settings, devices=["cpu"])
    assert (again.generated, again.skipped) == (0, 6)
