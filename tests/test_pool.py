"""GeneratorPool on the tiny checkpoint with two CPU replicas, and the device restriction it is built on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import zimage_turbo.machine as machine_module
import zimage_turbo.tasks as tasks_module
from zimage_turbo import (
    DeviceFailedError,
    GenerationRequest,
    GenerationResult,
    Generator,
    GeneratorClosedError,
    GeneratorPool,
    GPUInfo,
    Hardware,
    InvalidRequestError,
    InvalidSettingsError,
    ModelProfile,
    PromptFailure,
    StrategyUnavailableError,
    UnknownStrategyError,
    ZImageSettings,
    plan,
)
from zimage_turbo.hardware import GIB

PROMPTS = ["a red fox", "a lighthouse", "a bowl of fruit", "a paper dragon", "a snowy station"]
SIZE = {"height": 256, "width": 256, "steps": 2}


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and bool(np.array_equal(np.asarray(a), np.asarray(b)))


@pytest.fixture(scope="module")
def settings(tiny_checkpoint: Path) -> ZImageSettings:
    return ZImageSettings(model=str(tiny_checkpoint), progress=False)


@pytest.fixture(scope="module")
def pool(settings: ZImageSettings) -> Iterator[GeneratorPool]:
    with GeneratorPool(settings=settings, devices=["cpu", "cpu"]) as shared:
        yield shared


@pytest.fixture(scope="module")
def single(settings: ZImageSettings) -> list[GenerationResult]:
    """What one Generator makes for PROMPTS with seed 100: the reference for the pool."""
    with Generator(settings=settings) as gen:
        return gen.generate_many(PROMPTS, seed=100, **SIZE)


def results(outcomes: list[Any]) -> list[GenerationResult]:
    assert all(isinstance(o, GenerationResult) for o in outcomes), [str(o) for o in outcomes]
    return outcomes


def test_results_keep_the_order_and_equal_a_single_generators(
    pool: GeneratorPool, single: list[GenerationResult]
) -> None:
    assert pool.devices == ("cpu", "cpu")
    outcomes = results(pool.generate_many(PROMPTS, seed=100, **SIZE))
    assert [r.prompt for r in outcomes] == PROMPTS
    assert [r.seed for r in outcomes] == [100, 101, 102, 103, 104]  # the seeds generate_many gives
    assert all(same(a.image, b.image) for a, b in zip(outcomes, single, strict=True))
    assert len({np.asarray(r.image).tobytes() for r in outcomes}) == len(PROMPTS)  # not one image five times
    assert all(r.strategy == "cpu" for r in outcomes)
    # Explicit seeds per prompt, and random ones that are reported and reproduce the image.
    chosen = results(pool.generate_many([PROMPTS[4], PROMPTS[0]], seed=[104, 100], **SIZE))
    assert same(chosen[0].image, single[4].image) and same(chosen[1].image, single[0].image)
    drawn = results(pool.generate_many(PROMPTS[:1], **SIZE))[0]
    assert same(drawn.image, results(pool.generate_many(PROMPTS[:1], seed=drawn.seed, **SIZE))[0].image)


def test_diffusers_names_mean_ours_in_a_pool(pool: GeneratorPool, single: list[GenerationResult]) -> None:
    size = {"height": SIZE["height"], "width": SIZE["width"]}
    named = results(pool.generate_many(PROMPTS[:2], seed=100, num_inference_steps=SIZE["steps"], **size))
    assert all(same(a.image, b.image) for a, b in zip(named, single[:2], strict=True))
    pairs = [{"steps": 2, "num_inference_steps": 2}, {"num_images": 1, "num_images_per_prompt": 1}]
    for both in pairs:
        with pytest.raises(InvalidRequestError, match="two names"):
            pool.generate_many(["a cat"], **size, **both)  # type: ignore[arg-type]


def test_both_replicas_do_work(pool: GeneratorPool) -> None:
    loaded = [replica.is_loaded for replica in pool.replicas]
    assert loaded == [True, True]
    assert pool.replicas[0].pipeline is not pool.replicas[1].pipeline  # one model each, nothing shared
    busy: set[int] = set()
    original = Generator.generate

    def spy(self: Generator, *args: Any, **kwargs: Any) -> GenerationResult:
        busy.add(id(self))
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Generator, "generate", spy)
        # One slow prompt holds one replica; the other must take the rest.
        requests = [GenerationRequest(PROMPTS[0], height=512, width=512, steps=8, seed=1)]
        requests += [GenerationRequest(p, seed=2, **SIZE) for p in PROMPTS]
        order = [index for index, _ in pool.generate_requests(requests)]
    assert busy == {id(replica) for replica in pool.replicas}
    assert sorted(order) == list(range(len(requests)))  # every index exactly once
    assert order[0] != 0  # yielded as they finish: the slow first request is not first


def test_a_failing_prompt_loses_nothing_else(
    pool: GeneratorPool, single: list[GenerationResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_encode = tasks_module.encode

    def encode(pipe: Any, prompt: str, *args: Any) -> Any:
        if prompt == PROMPTS[2]:
            # An error of this prompt alone (a CUDA error that poisons the context would, rightly, stop the
            # replica it happened on: see test_faults.py).
            raise ValueError("this prompt breaks the text encoder")
        return real_encode(pipe, prompt, *args)

    monkeypatch.setattr(tasks_module, "encode", encode)
    outcomes = pool.generate_many(PROMPTS, seed=100, **SIZE)
    failure = outcomes[2]
    assert isinstance(failure, PromptFailure)
    assert (failure.index, failure.prompt, failure.device) == (2, PROMPTS[2], "cpu")
    assert isinstance(failure.error, ValueError) and "breaks the text encoder" in str(failure)
    kept = [o for i, o in enumerate(outcomes) if i != 2]
    expected = [r for i, r in enumerate(single) if i != 2]
    assert all(isinstance(o, GenerationResult) and same(o.image, r.image) for o, r in zip(kept, expected, strict=True))
    # The unordered form reports it too, once, with the others.
    unordered = dict(pool.as_completed(PROMPTS, seed=100, **SIZE))
    assert sorted(unordered) == list(range(len(PROMPTS)))
    assert [i for i, o in unordered.items() if isinstance(o, PromptFailure)] == [2]


ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def test_a_replica_whose_gpu_fails_is_retired_and_its_prompt_runs_elsewhere(
    settings: ZImageSettings, single: list[GenerationResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_encode = tasks_module.encode
    broken: list[Any] = []

    def encode(pipe: Any, prompt: str, *args: Any) -> Any:
        if prompt == PROMPTS[1] and not broken:
            broken.append(pipe)
            raise RuntimeError(ILLEGAL_ACCESS)  # what a poisoned CUDA context raises, on one replica, once
        return real_encode(pipe, prompt, *args)

    monkeypatch.setattr(tasks_module, "encode", encode)
    with GeneratorPool(settings=settings, devices=["cpu", "cpu"]) as two:
        outcomes = two.generate_many(PROMPTS, seed=100, **SIZE)
        assert all(same(o.image, r.image) for o, r in zip(results(outcomes), single, strict=True))
        assert two.retired == ("cpu",)
        [failed] = [replica for replica in two.replicas if replica.device_failure is not None]
        assert failed.pipeline is broken[0] and ILLEGAL_ACCESS in (failed.device_failure or "")
        # The pool goes on with the replica left.
        again = two.generate_many(PROMPTS[:3], seed=100, **SIZE)
        assert all(same(o.image, r.image) for o, r in zip(results(again), single[:3], strict=True))


def test_a_prompt_that_breaks_every_gpu_fails_without_hanging_the_pool(
    settings: ZImageSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_encode = tasks_module.encode

    def encode(pipe: Any, prompt: str, *args: Any) -> Any:
        if prompt == PROMPTS[1]:
            raise RuntimeError(ILLEGAL_ACCESS)
        return real_encode(pipe, prompt, *args)

    monkeypatch.setattr(tasks_module, "encode", encode)
    with GeneratorPool(settings=settings, devices=["cpu", "cpu"]) as two:
        outcomes = two.generate_many(PROMPTS, seed=100, **SIZE)
        failure = outcomes[1]
        assert isinstance(failure, PromptFailure) and ILLEGAL_ACCESS in str(failure.error)
        assert two.retired == ("cpu", "cpu")  # it was tried on a second card, which broke too
        # Nothing is left to run on: every later prompt fails at once, saying why.
        later = two.generate_many(PROMPTS[:2], seed=100, **SIZE)
        assert all(isinstance(o, PromptFailure) and isinstance(o.error, DeviceFailedError) for o in later)


def test_leaving_the_loop_early_cancels_the_rest(pool: GeneratorPool) -> None:
    calls = 0
    original = Generator.generate

    def count(self: Generator, *args: Any, **kwargs: Any) -> GenerationResult:
        nonlocal calls
        calls += 1
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Generator, "generate", count)
        for _ in pool.as_completed([f"prompt {i}" for i in range(40)], seed=0, **SIZE):
            break
    assert calls < 40
    # The pool is still whole afterwards: both replicas are free for the next prompts.
    assert len(results(pool.generate_many(PROMPTS[:2], seed=100, **SIZE))) == 2


def test_bad_arguments_fail_before_anything_loads(settings: ZImageSettings) -> None:
    lazy = GeneratorPool(settings=settings, devices=["cpu", "cpu"])
    with pytest.raises(InvalidRequestError):
        lazy.generate_many(["a cat", "   "])
    with pytest.raises(InvalidRequestError, match="list of prompts"):
        lazy.generate_many("a cat")
    with pytest.raises(InvalidRequestError):
        lazy.as_completed(["a cat"], height=1000)
    assert "not resolved" in repr(lazy)
    assert not any(replica.is_loaded for replica in lazy.replicas)
    for devices in ("every", [], ["gpu zero"], 5, None):
        with pytest.raises(InvalidRequestError):
            GeneratorPool(settings=settings, devices=devices)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="multi_gpu"):
        GeneratorPool(settings=settings, strategy="multi_gpu")
    with pytest.raises(InvalidSettingsError, match="ZImageSettings"):
        GeneratorPool(settings={"model": "x"})  # type: ignore[arg-type]
    with pytest.raises(UnknownStrategyError):
        GeneratorPool(settings=settings, strategy="turbo")


def test_close_releases_the_replicas(settings: ZImageSettings) -> None:
    with GeneratorPool(settings=settings, devices=["cpu"], load=True) as pool:
        [replica] = pool.replicas
        assert replica.is_loaded
    assert not replica.is_loaded and repr(pool) == "GeneratorPool(closed)"
    with pytest.raises(GeneratorClosedError):
        pool.generate_many(["a cat"], **SIZE)


def closed_while_waiting(settings: ZImageSettings, wait: Callable[[GeneratorPool], object]) -> BaseException | None:
    """Run ``wait(pool)`` in a thread over a one-replica pool, close the pool from here once the first prompt
    is done, and return what the waiting thread raised (it must end within seconds)."""
    pool = GeneratorPool(settings=settings, devices=["cpu"], load=True)
    first_done = threading.Event()
    raised: list[BaseException] = []
    original = Generator.generate

    def marked(self: Generator, *args: Any, **kwargs: Any) -> GenerationResult:
        result = original(self, *args, **kwargs)
        first_done.set()
        return result

    def waiter() -> None:
        try:
            wait(pool)
        except BaseException as exc:
            raised.append(exc)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Generator, "generate", marked)
        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        assert first_done.wait(timeout=60)
        started = time.monotonic()
        pool.close()
        thread.join(timeout=30)
    assert not thread.is_alive(), "closing the pool left the waiting thread hanging"
    assert time.monotonic() - started < 30
    return raised[0] if raised else None


def test_closing_the_pool_wakes_a_thread_iterating_as_completed(settings: ZImageSettings) -> None:
    def iterate(pool: GeneratorPool) -> None:
        for _ in pool.as_completed([f"prompt {i}" for i in range(6)], seed=0, **SIZE):
            pass

    error = closed_while_waiting(settings, iterate)
    assert isinstance(error, GeneratorClosedError) and "closed" in str(error)


def test_closing_the_pool_wakes_generate_many_with_a_typed_error(settings: ZImageSettings) -> None:
    error = closed_while_waiting(
        settings, lambda pool: pool.generate_many([f"prompt {i}" for i in range(6)], seed=0, **SIZE)
    )
    assert isinstance(error, GeneratorClosedError)


def test_all_on_a_machine_without_gpus_is_one_replica(settings: ZImageSettings) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only case")
    pool = GeneratorPool(settings=settings)
    assert pool.devices == ("default",) and pool.replicas[0].device is None


# -- "all" on hand-built GPUs: which cards get a replica (the planner decides; nothing loads) ---------------------


def gpus(*gibs: float) -> Hardware:
    cards = tuple(GPUInfo(i, f"{g:g} GiB card", int(g * GIB), int(g * GIB), (8, 9)) for i, g in enumerate(gibs))
    return Hardware(gpus=cards, host_total_bytes=128 * GIB, host_available_bytes=120 * GIB)


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Pretend this machine has the given GPUs, and that the checkpoint has the real model's sizes."""

    def install(hardware: Hardware) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(hardware.gpus))
        monkeypatch.setattr(machine_module, "detect_hardware", lambda **_: hardware)
        real = ModelProfile.z_image_turbo

        monkeypatch.setattr(ModelProfile, "from_layout", classmethod(lambda cls, layout, dtype_bytes=2: real()))

    return install


def test_all_takes_every_card_that_holds_the_whole_model(settings: ZImageSettings, fake_gpus: Any) -> None:
    fake_gpus(gpus(24, 12, 80))
    pool = GeneratorPool(settings=settings)
    # fastest first; the 12 GiB card streams the model from the host, and its images add to the others'
    assert pool.devices == ("cuda:0", "cuda:2", "cuda:1")
    assert not any(replica.is_loaded for replica in pool.replicas)
    # Each replica plans for its own card only: no multi_gpu over the others, full_gpu on its card.
    best = pool.replicas[1].plan().best
    assert best is not None and best.name == "full_gpu" and set(best.estimate.gpu_peak) == {2}
    small = pool.replicas[2].plan().best
    assert small is not None and small.strategy.offloads and set(small.estimate.gpu_peak) == {1}


def test_all_skips_a_card_nothing_fits_on_and_stops_where_host_ram_ends(
    settings: ZImageSettings, fake_gpus: Any
) -> None:
    fake_gpus(gpus(80, 80, 80, 1))
    assert GeneratorPool(settings=settings).devices == ("cuda:0", "cuda:1", "cuda:2")  # 1 GiB holds nothing
    # Three small cards: each replica would pin the streamed weights in host RAM; 48 GiB holds two such copies.
    small = gpus(80, 8, 8, 8)
    fake_gpus(replace(small, host_total_bytes=64 * GIB, host_available_bytes=48 * GIB))
    assert GeneratorPool(settings=settings).devices == ("cuda:0", "cuda:1", "cuda:2")


def test_all_on_cards_too_small_for_a_replica_is_one_model_over_all_of_them(
    settings: ZImageSettings, fake_gpus: Any
) -> None:
    # Two 12 GiB cards in 32 GiB of host RAM: a replica per card streams part of the model from pinned host
    # memory, and the host holds one such copy, so replicas would give one card's images (1.5 s each); one
    # model over both cards needs no host copy and makes them about as fast.
    fake_gpus(replace(gpus(12, 12), host_total_bytes=32 * GIB, host_available_bytes=28 * GIB))
    pool = GeneratorPool(settings=settings)
    assert pool.devices == ("default",)  # not restricted: it plans over both cards
    best = pool.replicas[0].plan().best
    assert best is not None and best.name == "multi_gpu" and set(best.estimate.gpu_peak) == {0, 1}
    # With host RAM for a copy each, a replica per card (partial on each) makes twice the images.
    fake_gpus(gpus(12, 12))
    assert GeneratorPool(settings=settings).devices == ("cuda:0", "cuda:1")
    # A named offloading strategy makes such cards acceptable replicas, one each.
    assert GeneratorPool(settings=settings, strategy="streamed").devices == ("cuda:0", "cuda:1")


# -- the device restriction each replica uses ---------------------------------------------------------------------


def test_restricted_hardware_shows_one_device() -> None:
    hardware = gpus(16, 16)
    only = hardware.restricted_to("cuda:1")
    assert [g.index for g in only.gpus] == [1]
    assert all(c.strategy.name != "multi_gpu" for c in plan(ModelProfile.z_image_turbo(), only).candidates)
    best = plan(ModelProfile.z_image_turbo(), only).best
    assert best is not None and set(best.estimate.gpu_peak) == {1}
    assert hardware.restricted_to("cpu").gpus == () and not hardware.restricted_to("cpu").mps
    with pytest.raises(StrategyUnavailableError, match="no cuda:2; visible GPUs: cuda:0, cuda:1"):
        hardware.restricted_to("cuda:2")
    with pytest.raises(StrategyUnavailableError, match="MPS"):
        hardware.restricted_to("mps")
    assert replace(hardware, mps=True, gpus=()).restricted_to("mps").mps


def test_a_generator_restricted_to_a_missing_gpu_says_so(settings: ZImageSettings) -> None:
    if torch.cuda.device_count() > 3:
        pytest.skip("needs a machine with fewer than four GPUs")
    gen = Generator(settings=settings, device="cuda:3")
    assert gen.device == torch.device("cuda", 3)
    with pytest.raises(StrategyUnavailableError, match="no cuda:3"):
        gen.generate("a cat", **SIZE)
    assert not gen.is_loaded
    with pytest.raises(InvalidRequestError, match="device"):
        Generator(settings=settings, device="tpu:0")
    assert Generator(settings=settings, device="cuda").device == torch.device("cuda", 0)
