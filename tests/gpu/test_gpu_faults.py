"""Faults on a real GPU with the full-size checkpoint: real out-of-memory errors in each phase (a hook grabs more
memory than the card has), an interrupt inside a streamed forward, an exception from the callback. After each,
allocated memory is back to its level and the next image is the one made before the fault.

The CPU suite (tests/test_faults.py) checks the control flow; only here are the memory numbers real.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from zimage_turbo import Generator, StepInfo, ZImageSettings

pytestmark = pytest.mark.gpu

PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"
SIZE = {"height": 512, "width": 512}
SEED = 3
MIB = 2**20
TOLERANCE = 64 * MIB


def _difference(a: Any, b: Any) -> int:
    return int(np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).max())


def _allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


@pytest.fixture(scope="module")
def gen(full_checkpoint: Path) -> Iterator[Generator]:
    generator = Generator(model=full_checkpoint, strategy="full_gpu", settings=ZImageSettings(progress=False))
    generator.load()
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def reference(gen: Generator) -> Any:
    return gen.generate(PROMPT, seed=SEED, **SIZE).image


@pytest.fixture
def hooks() -> Iterator[Callable[[torch.nn.Module, Callable[..., None]], None]]:
    handles: list[Any] = []

    def install(module: torch.nn.Module, hook: Callable[..., None]) -> None:
        handles.append(module.register_forward_pre_hook(hook))

    yield install
    for handle in handles:
        handle.remove()


def _grab_more_than_free(*_: Any) -> None:
    """A real allocation failure: ask the caching allocator for more than the whole card (asking for a little
    more than the free memory can succeed: the allocator then frees its cache and retries)."""
    _, total = torch.cuda.mem_get_info()
    torch.empty(total + 2**30, dtype=torch.uint8, device="cuda")


@pytest.mark.parametrize("phase", ["encode", "denoise", "decode"])
def test_a_real_out_of_memory_error_in_each_phase_leaves_the_generator_usable(
    gen: Generator, reference: Any, hooks: Callable[..., None], phase: str
) -> None:
    gen.switch("full_gpu")
    level = _allocated()
    module = {"encode": gen.pipeline.text_encoder, "denoise": gen.pipeline.transformer, "decode": gen.pipeline.vae}
    fired = [False]

    def once(*args: Any) -> None:
        if not fired[0]:
            fired[0] = True
            _grab_more_than_free(*args)

    target = module[phase].decoder if phase == "decode" else module[phase]
    hooks(target, once)
    result = gen.generate(PROMPT, seed=SEED, **SIZE)
    assert fired[0] and result.fallbacks and result.fallbacks[0].phase == phase
    assert _difference(result.image, reference) <= 2 or result.vae_tiling
    gen.switch("full_gpu")
    assert abs(_allocated() - level) <= TOLERANCE
    again = gen.generate(PROMPT, seed=SEED, **SIZE)
    assert again.fallbacks == () and _difference(again.image, reference) <= 2


def test_an_interrupt_inside_a_streamed_forward_leaves_no_block_on_the_gpu(
    gen: Generator, reference: Any, hooks: Callable[..., None]
) -> None:
    gen.switch("streamed")
    first = gen.generate(PROMPT, seed=SEED, **SIZE)  # also traces the prefetch order
    level = _allocated()
    passes = [0]

    def interrupt_in_the_second_pass(*_: Any) -> None:
        passes[0] += 1
        if passes[0] == 2:
            raise KeyboardInterrupt

    # Inside block 10: it is on the GPU, and block 11 is being prefetched, when the interrupt comes.
    hooks(gen.pipeline.transformer.layers[10].attention, interrupt_in_the_second_pass)
    with pytest.raises(KeyboardInterrupt):
        gen.generate(PROMPT, seed=SEED, **SIZE)
    assert _allocated() <= level + TOLERANCE  # both blocks went home with the reset hooks
    passes[0] = 10  # no more interrupts
    again = gen.generate(PROMPT, seed=SEED, **SIZE)
    assert _difference(again.image, first.image) <= 2 and _difference(again.image, reference) <= 2
    assert abs(_allocated() - level) <= TOLERANCE


@pytest.mark.parametrize("strategy", ["full_gpu", "hybrid", "model_offload"])
def test_an_exception_from_the_callback_leaves_memory_at_its_level(
    gen: Generator, reference: Any, strategy: str
) -> None:
    gen.switch(strategy)
    gen.generate(PROMPT, seed=SEED, **SIZE)
    level = _allocated()

    def stop(info: StepInfo) -> None:
        if info.step == 4:
            raise ValueError("enough")

    for _ in range(5):  # and no growth from one to the next
        with pytest.raises(ValueError, match="enough"):
            gen.generate(PROMPT, seed=SEED, callback=stop, **SIZE)
        # model_offload leaves the last component it ran (the VAE) on the GPU after a whole generation, and
        # none after a reset: at most the level, never more
        assert _allocated() <= level + TOLERANCE
    assert _difference(gen.generate(PROMPT, seed=SEED, **SIZE).image, reference) <= 2
