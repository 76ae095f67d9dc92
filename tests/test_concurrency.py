"""Threads: one Generator shared by 8 threads gives every image its single-threaded twin; two Generators in one
process share no mutable object and give the same images side by side; a switch waits for the generation in
progress."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_turbo import FullGPU, Generator, ModelCPUOffload, StepInfo, ZImageSettings
from zimage_turbo.strategies.base import host_homes

THREADS = 8
PER_THREAD = 3
SIZES = [(256, 256), (256, 320), (320, 256)]


def jobs() -> list[tuple[str, int, int, int]]:
    """(prompt, height, width, seed) for each thread's requests: mixed sizes, distinct seeds."""
    out = []
    for thread in range(THREADS):
        for k in range(PER_THREAD):
            height, width = SIZES[(thread + k) % len(SIZES)]
            out.append((f"thread {thread} request {k}: a harbour at night", height, width, 1000 * thread + k))
    return out


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and bool(np.array_equal(np.asarray(a), np.asarray(b)))


def make(checkpoint: Path, strategy: Any = "cpu") -> Generator:
    return Generator(model=checkpoint, strategy=strategy, settings=ZImageSettings(progress=False))


@pytest.fixture(scope="module")
def twins(tiny_checkpoint: Path) -> dict[int, Image.Image]:
    """Every job's image, made one after the other in this thread."""
    gen = make(tiny_checkpoint)
    return {seed: gen.generate(p, height=h, width=w, steps=1, seed=seed).image for p, h, w, seed in jobs()}


@pytest.fixture
def occupancy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Records how many generations are inside the pipeline at each entry (all Generators together)."""
    inside = [0]
    seen: list[int] = []
    guard = threading.Lock()
    original = Generator._generate  # one request, from the lock to its result

    def counted(self: Generator, *args: Any) -> Any:
        with guard:
            inside[0] += 1
            seen.append(inside[0])
        try:
            time.sleep(0.002)  # widen the window in which an unserialized second call would overlap
            return original(self, *args)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(Generator, "_generate", counted)
    yield seen


def run_threads(work: Callable[[int], None], count: int) -> None:
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:  # reported below, with the thread's own traceback
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish (deadlock?)"
    if errors:
        raise errors[0]


def test_eight_threads_on_one_generator_give_every_image_its_single_threaded_twin(
    tiny_checkpoint: Path, twins: dict[int, Image.Image], occupancy: list[int]
) -> None:
    gen = make(tiny_checkpoint)
    gen.load()
    results: dict[int, Image.Image] = {}
    start = threading.Barrier(THREADS)
    mine = jobs()

    def work(thread: int) -> None:
        start.wait()  # all threads ask at once
        for prompt, height, width, seed in mine[thread * PER_THREAD : (thread + 1) * PER_THREAD]:
            results[seed] = gen.generate(prompt, height=height, width=width, steps=1, seed=seed).image

    run_threads(work, THREADS)
    assert sorted(results) == sorted(twins)
    assert all(same(results[seed], twins[seed]) for seed in twins)
    assert len(occupancy) == THREADS * PER_THREAD and max(occupancy) == 1  # one generation at a time


def test_two_generators_share_no_mutable_state(tiny_checkpoint: Path) -> None:
    strategy = ModelCPUOffload(device="cpu")  # the same instance given to both
    a, b = make(tiny_checkpoint, strategy), make(tiny_checkpoint, strategy)
    a.load()
    b.load()
    pa, pb = a.pipeline, b.pipeline
    for name in ("scheduler", "tokenizer", "text_encoder", "transformer", "vae", "image_processor"):
        assert getattr(pa, name) is not getattr(pb, name), name
    assert pa.tokenizer._tokenizer is not pb.tokenizer._tokenizer  # the Rust tokenizer: "Already borrowed"
    assert pa.scheduler.config is not pb.scheduler.config
    assert host_homes(pa) is not host_homes(pb)
    assert a.strategy is not b.strategy and a.strategy is not strategy and a.strategy == strategy
    assert a._guard.lock is not b._guard.lock
    storage = {
        name: {
            t.untyped_storage().data_ptr()
            for m in (p.text_encoder, p.transformer, p.vae)
            for t in m.state_dict().values()
        }
        for name, p in (("a", pa), ("b", pb))
    }
    assert not storage["a"] & storage["b"]  # no weight shared either
    # Modules' own mutable state (the RoPE table cache, hooks) lives on the modules above; a sample:
    assert pa.transformer.rope_embedder is not pb.transformer.rope_embedder


def test_two_generators_run_side_by_side_and_give_the_twins(
    tiny_checkpoint: Path, twins: dict[int, Image.Image], occupancy: list[int]
) -> None:
    generators = [make(tiny_checkpoint), make(tiny_checkpoint, FullGPU(device="cpu"))]
    for gen in generators:
        gen.load()
    selected = jobs()[:8]
    results: dict[int, Image.Image] = {}

    def work(thread: int) -> None:
        gen = generators[thread % 2]
        for prompt, height, width, seed in selected[thread::4]:
            results[seed] = gen.generate(prompt, height=height, width=width, steps=1, seed=seed).image

    run_threads(work, 4)
    assert all(same(results[seed], twins[seed]) for _, _, _, seed in selected)
    assert max(occupancy) <= 2  # at most one per Generator


def test_a_switch_from_another_thread_waits_for_the_generation_in_progress(
    tiny_checkpoint: Path, twins: dict[int, Image.Image]
) -> None:
    gen = make(tiny_checkpoint)
    gen.load()
    prompt, height, width, seed = jobs()[0]
    in_step = threading.Event()
    events: list[str] = []

    def slow_step(info: StepInfo) -> None:
        in_step.set()
        time.sleep(0.3)  # the switch below is asked for now, while the generation holds the Generator
        events.append(f"step {info.step} under {info.strategy}")

    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(gen.generate, prompt, height=height, width=width, steps=1, seed=seed, callback=slow_step)
        assert in_step.wait(timeout=60)
        gen.switch(FullGPU(device="cpu"))
        events.append("switched")
        result = running.result(timeout=60)
    assert events == ["step 1 under cpu", "switched"]
    assert result.strategy == "cpu" and same(result.image, twins[seed])
    assert gen.strategy == FullGPU(device="cpu")
    assert same(gen.generate(prompt, height=height, width=width, steps=1, seed=seed).image, twins[seed])


def test_threads_do_not_change_torch_settings_for_each_other(tiny_checkpoint: Path) -> None:
    # inference_mode and grad mode are per thread: a generation in one thread must not leave another
    # thread (or the caller) in inference mode.
    gen = make(tiny_checkpoint)
    seen: list[bool] = []

    def work(_: int) -> None:
        gen.generate("a cat", height=256, width=256, steps=1, seed=0)
        seen.append(torch.is_inference_mode_enabled() or not torch.is_grad_enabled())

    run_threads(work, 2)
    assert seen == [False, False]
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
