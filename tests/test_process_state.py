"""Process-wide state: two Generators loading at once leave PyTorch as they found it, a generation never runs
while another thread's load has the default dtype changed, and the lock behind both behaves."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from zimage_turbo import Generator, ZImageSettings, make_checkpoint, process_state

ORIGINAL_REGISTER_PARAMETER = torch.nn.Module.register_parameter


def bf16_generator(checkpoint: Path) -> Generator:
    # bfloat16 so that loading really changes the default dtype (float32 on a CPU otherwise)
    return Generator(model=checkpoint, strategy="cpu", settings=ZImageSettings(progress=False, dtype="bfloat16"))


def slow_config(monkeypatch: pytest.MonkeyPatch, pause: Any) -> None:
    """Make reading the text encoder's config (inside the empty-weights patch) call ``pause`` first."""
    from transformers import Qwen3Config

    original = Qwen3Config.from_pretrained.__func__  # type: ignore[attr-defined]

    def paused(cls: Any, *args: Any, **kwargs: Any) -> Any:
        pause()
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Qwen3Config, "from_pretrained", classmethod(paused))


def test_two_generators_loading_at_once_leave_torch_as_it_was(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both threads inside the config read at the same time would interleave the two patches; the pause makes
    # that overlap certain without the lock.
    slow_config(monkeypatch, lambda: time.sleep(0.3))
    generators = [bf16_generator(tiny_checkpoint) for _ in range(2)]
    errors: list[BaseException] = []

    def load(gen: Generator) -> None:
        try:
            gen.load()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(gen,)) for gen in generators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert torch.nn.Module.register_parameter is ORIGINAL_REGISTER_PARAMETER
    assert torch.get_default_dtype() == torch.float32
    out = torch.nn.Linear(4, 4)(torch.ones(1, 4))  # a module of the user's program gets real weights
    assert not out.is_meta and out.shape == (1, 4)
    for gen in generators:
        transformer = gen.pipeline.transformer
        assert not any(param.is_meta for param in transformer.parameters())
        assert {param.dtype for param in transformer.parameters()} == {torch.bfloat16}
        gen.close()


def test_a_generation_waits_while_another_generator_loads(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three steps: the sigma schedule 1, 2/3, 1/3 is not exact in bfloat16, so a float32 generation whose
    # schedule is computed while the other thread's load has bfloat16 as the default dtype gives another image.
    prompt, seed = "a lighthouse in fog", 11
    running = Generator(model=tiny_checkpoint, strategy="cpu", settings=ZImageSettings(progress=False))
    twin = running.generate(prompt, height=256, width=256, steps=3, seed=seed).image

    inside_load = threading.Event()
    generation_stepped = threading.Event()

    def pause() -> None:
        inside_load.set()
        # without the lock, the generation below runs now and steps; with it, it waits until this load ends
        generation_stepped.wait(timeout=1.5)

    slow_config(monkeypatch, pause)
    loading = bf16_generator(tiny_checkpoint)
    loader = threading.Thread(target=loading.load)
    loader.start()
    assert inside_load.wait(timeout=30)
    image = running.generate(
        prompt, height=256, width=256, steps=3, seed=seed, callback=lambda info: generation_stepped.set()
    ).image
    loader.join(timeout=60)
    assert np.array_equal(np.asarray(image), np.asarray(twin))
    assert torch.get_default_dtype() == torch.float32
    running.close()
    loading.close()


def test_state_left_changed_inside_is_restored_even_on_failure() -> None:
    def leaky(self: torch.nn.Module, name: str, param: Any) -> None:  # pragma: no cover - never called
        raise AssertionError

    with pytest.raises(RuntimeError, match="boom"), process_state.exclusive():
        torch.nn.Module.register_parameter = leaky  # type: ignore[method-assign]
        torch.set_default_dtype(torch.float64)
        raise RuntimeError("boom")
    assert torch.nn.Module.register_parameter is ORIGINAL_REGISTER_PARAMETER
    assert torch.get_default_dtype() == torch.float32


def test_exclusive_waits_for_shared_holders_and_blocks_new_ones() -> None:
    order: list[str] = []
    reading = threading.Event()
    release_reader = threading.Event()

    def reader() -> None:
        with process_state.shared():
            reading.set()
            release_reader.wait(timeout=10)
            order.append("first shared done")

    def writer() -> None:
        with process_state.exclusive():
            order.append("exclusive")

    def late_reader() -> None:
        with process_state.shared():
            order.append("late shared")

    first = threading.Thread(target=reader)
    first.start()
    assert reading.wait(timeout=10)
    change = threading.Thread(target=writer)
    change.start()
    time.sleep(0.1)  # the writer is waiting now
    late = threading.Thread(target=late_reader)
    late.start()
    time.sleep(0.1)
    assert order == []  # the writer waits for the reader, the late reader for the waiting writer
    release_reader.set()
    for thread in (first, change, late):
        thread.join(timeout=10)
    assert order == ["first shared done", "exclusive", "late shared"]


def test_a_thread_holding_shared_may_change_state() -> None:
    # a step callback that loads another Generator: no deadlock with its own shared hold
    with process_state.shared(), process_state.exclusive(), process_state.default_dtype(torch.bfloat16):
        assert torch.get_default_dtype() == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32


def test_make_checkpoint_leaves_the_callers_random_numbers_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    make_checkpoint("tiny", tmp_path / "ckpt", seed=7)
    assert torch.equal(torch.rand(4), expected)
