"""Strategy switching and the out-of-memory ladder, on the tiny checkpoint, on the CPU.

Every strategy can run with ``device="cpu"``: the same hooks and moves, on the CPU. That lets these tests
switch between all of them on one set of weights and compare each image with plain diffusers bit for bit.
Out-of-memory errors are real ``torch.OutOfMemoryError`` exceptions raised from hooks inside the pipeline;
the GPU suite forces real ones with a memory cap.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from test_generator import plain_diffusers, same
from zimage_turbo import (
    CPUOnly,
    FullGPU,
    Generator,
    Hybrid,
    ModelCPUOffload,
    NotEnoughMemoryError,
    PlacementFailedError,
    SequentialOffload,
    StreamedOffload,
    ZImageSettings,
)
from zimage_turbo.strategies.base import LoadStrategy

PROMPT = "a red fox in fresh snow at dawn"


def every_strategy() -> list[LoadStrategy]:
    return [
        FullGPU(device="cpu"),
        Hybrid(device="cpu"),
        ModelCPUOffload(device="cpu"),
        StreamedOffload(device="cpu"),
        SequentialOffload(device="cpu"),
        CPUOnly(),
    ]


def hooks_left(pipe: Any) -> list[str]:
    found = []
    for name in ("transformer", "text_encoder", "vae"):
        for path, module in getattr(pipe, name).named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.hooks:
                found.append(f"{name}.{path}: {list(registry.hooks)}")
            if hasattr(module, "_hf_hook"):
                found.append(f"{name}.{path}: accelerate hook")
    return found


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Image.Image:
    [image] = plain_diffusers(tiny_checkpoint, PROMPT, height=256, width=256, steps=4, seeds=[5])
    return image


def test_switching_strategies_on_the_same_weights_keeps_images_bit_identical(
    tiny_checkpoint: Path, reference: Image.Image
) -> None:
    gen = Generator(model=tiny_checkpoint, strategy=CPUOnly(), settings=ZImageSettings(progress=False), load=True)
    pipe = gen.pipeline
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    for strategy in every_strategy():
        gen.switch(strategy)
        assert gen.strategy == strategy
        result = gen.generate(PROMPT, height=256, width=256, steps=4, seed=5)
        assert result.strategy == strategy.name and result.fallbacks == ()
        assert same(result.image, reference), strategy.name
    # Back on the CPU strategy: no hook is left behind and the weights are untouched, in the same modules.
    assert gen.pipeline is pipe and hooks_left(pipe) == []
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_each_switch_removes_the_previous_hooks(tiny_checkpoint: Path) -> None:
    gen = Generator(
        model=tiny_checkpoint, strategy=StreamedOffload(device="cpu"), settings=ZImageSettings(progress=False)
    )
    gen.generate(PROMPT, height=256, width=256, steps=1, seed=0)
    assert hooks_left(gen.pipeline)  # streaming installed diffusers hooks
    gen.switch(ModelCPUOffload(device="cpu"))
    left = hooks_left(gen.pipeline)
    assert left and all("accelerate hook" in entry for entry in left)  # only model offload's own
    gen.switch("cpu")
    assert hooks_left(gen.pipeline) == []


# -- injected out-of-memory errors -----------------------------------------------------------------------


@pytest.fixture
def inject() -> Iterator[Callable[..., None]]:
    handles: list[Any] = []

    def install(module: torch.nn.Module, when: Callable[[], bool], error: BaseException | None = None) -> None:
        def hook(*_: Any) -> None:
            if when():
                raise error if error is not None else torch.OutOfMemoryError("CUDA out of memory (injected)")

        handles.append(module.register_forward_pre_hook(hook))

    yield install
    for handle in handles:
        handle.remove()


def generator(tiny_checkpoint: Path, strategy: Any = None, **settings: Any) -> Generator:
    return Generator(model=tiny_checkpoint, strategy=strategy, settings=ZImageSettings(progress=False, **settings))


def test_oom_while_denoising_falls_back_and_keeps_the_image(
    tiny_checkpoint: Path, reference: Image.Image, inject: Callable[..., None]
) -> None:
    gen = generator(tiny_checkpoint, FullGPU(device="cpu"))
    gen.load()
    inject(gen.pipeline.transformer, lambda: isinstance(gen.strategy, FullGPU))
    result = gen.generate(PROMPT, height=256, width=256, steps=4, seed=5)
    assert result.strategy == "cpu"
    [fallback] = result.fallbacks
    assert (fallback.kind, fallback.before, fallback.phase) == ("strategy", "full_gpu", "denoise")
    assert "injected" in fallback.reason
    assert same(result.image, reference)  # the retry starts from the same seed: the same image
    # The Generator keeps the strategy that worked: the next call needs no fallback.
    again = gen.generate(PROMPT, height=256, width=256, steps=4, seed=5)
    assert again.fallbacks == () and again.strategy == "cpu"


def test_oom_while_encoding_is_recorded_in_that_phase(tiny_checkpoint: Path, inject: Callable[..., None]) -> None:
    gen = generator(tiny_checkpoint, Hybrid(device="cpu"))
    gen.load()
    inject(gen.pipeline.text_encoder, lambda: isinstance(gen.strategy, Hybrid))
    result = gen.generate(PROMPT, height=256, width=256, steps=2, seed=1)
    assert [(f.before, f.phase) for f in result.fallbacks] == [("hybrid", "encode")]


def test_oom_while_decoding_retries_the_same_latents_in_tiles(
    tiny_checkpoint: Path, inject: Callable[..., None]
) -> None:
    gen = generator(tiny_checkpoint, CPUOnly())
    gen.load()
    denoise_calls = []
    gen.pipeline.transformer.register_forward_pre_hook(lambda *_: denoise_calls.append(1))
    # Pretend that decoding more than 512x512 pixels in one piece runs out of memory.
    inject(gen.pipeline.vae.decoder, lambda: not gen.pipeline.vae.use_tiling and _pixels(gen) > 512 * 512)
    result = gen.generate(PROMPT, height=768, width=1024, steps=3, seed=2)
    assert result.vae_tiling and result.image.size == (1024, 768)
    [fallback] = result.fallbacks
    assert (fallback.kind, fallback.phase) == ("vae_tiling", "decode")
    assert len(denoise_calls) == 3  # three passes: the denoising was not repeated
    # The strategy in use keeps tiling from that size up: the next call does not run out of memory first.
    again = gen.generate(PROMPT, height=768, width=1024, steps=3, seed=2)
    assert again.vae_tiling and again.fallbacks == () and same(again.image, result.image)
    assert not gen.generate(PROMPT, height=256, width=256, steps=1, seed=2).vae_tiling
    [untiled] = plain_diffusers(tiny_checkpoint, PROMPT, height=768, width=1024, steps=3, seeds=[2])
    difference = np.abs(np.asarray(result.image).astype(int) - np.asarray(untiled).astype(int))
    assert difference.mean() < 8  # tiles blend at their seams; otherwise the same picture


def test_out_of_rungs_raises_a_typed_error_and_the_generator_stays_usable(
    tiny_checkpoint: Path, reference: Image.Image, inject: Callable[..., None]
) -> None:
    gen = generator(tiny_checkpoint, FullGPU(device="cpu"))
    gen.load()
    failing = [True]
    inject(gen.pipeline.transformer, lambda: failing[0])
    with pytest.raises(NotEnoughMemoryError) as caught:
        gen.generate(PROMPT, height=256, width=256, steps=4, seed=5)
    tried = [f.before for f in caught.value.tried]  # type: ignore[attr-defined]
    assert tried == ["full_gpu", "cpu"]
    assert "full_gpu" in str(caught.value) and "denoise" in str(caught.value)
    failing[0] = False
    after = gen.generate(PROMPT, height=256, width=256, steps=4, seed=5)
    assert same(after.image, reference)


def test_downscale_only_when_allowed(tiny_checkpoint: Path, inject: Callable[..., None]) -> None:
    for allow in (False, True):
        gen = generator(tiny_checkpoint, CPUOnly(), allow_downscale=allow)
        gen.load()
        # Pretend that anything above 800x600 pixels runs out of memory.
        inject(gen.pipeline.transformer, lambda g=gen: _pixels(g) > 800 * 600)
        if not allow:
            with pytest.raises(NotEnoughMemoryError) as caught:
                gen.generate(PROMPT, height=768, width=1024, steps=1, seed=0)
            assert "allow_downscale" in str(caught.value) and caught.value.would_fit  # type: ignore[attr-defined]
            continue
        result = gen.generate(PROMPT, height=768, width=1024, steps=1, seed=0)
        assert (result.width, result.height) == (752, 560)  # 3/4 of the pixels twice, aspect kept
        assert result.width % 16 == 0 and result.height % 16 == 0
        assert abs(result.width / result.height - 4 / 3) < 0.05
        assert result.image.size == (result.width, result.height)
        kinds = [f.kind for f in result.fallbacks]
        assert "downscale" in kinds
        first = next(f for f in result.fallbacks if f.kind == "downscale")
        assert first.before == "1024x768"


_LAST_SHAPE: dict[int, int] = {}


def _pixels(gen: Generator) -> int:
    return _LAST_SHAPE.get(id(gen), 0)


@pytest.fixture(autouse=True)
def track_latent_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record the requested size of each call, for the downscale test's injected condition."""
    import zimage_turbo.generator as module

    original = module.Generator._run_rung  # one rung's attempt at a request (the size may have been lowered)

    def tracked(self: Generator, call: Any, request: Any, *args: Any) -> Any:
        _LAST_SHAPE[id(self)] = request.height * request.width
        return original(self, call, request, *args)

    monkeypatch.setattr(module.Generator, "_run_rung", tracked)


def test_other_cuda_errors_are_not_treated_as_memory(tiny_checkpoint: Path, inject: Callable[..., None]) -> None:
    gen = generator(tiny_checkpoint, CPUOnly())
    gen.load()
    illegal = RuntimeError("CUDA error: an illegal memory access was encountered")
    inject(gen.pipeline.transformer, lambda: True, illegal)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        gen.generate(PROMPT, height=256, width=256, steps=1, seed=0)


def test_cublas_allocation_failure_counts_as_out_of_memory(tiny_checkpoint: Path, inject: Callable[..., None]) -> None:
    gen = generator(tiny_checkpoint, FullGPU(device="cpu"))
    gen.load()
    error = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    inject(gen.pipeline.transformer, lambda: isinstance(gen.strategy, FullGPU), error)
    assert gen.generate(PROMPT, height=256, width=256, steps=1, seed=0).strategy == "cpu"


def test_the_failed_attempt_is_freed_before_the_retry(tiny_checkpoint: Path, inject: Callable[..., None]) -> None:
    gen = generator(tiny_checkpoint, FullGPU(device="cpu"))
    gen.load()
    sentinels: list[weakref.ref[torch.Tensor]] = []
    alive_at_retry: list[bool] = []

    def allocate_then_fail(*_: Any) -> None:
        if isinstance(gen.strategy, FullGPU):
            scratch = torch.empty(1 << 20)  # stands for the activations of the failed pass
            sentinels.append(weakref.ref(scratch))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        gc.collect()
        alive_at_retry.append(any(ref() is not None for ref in sentinels))

    gen.pipeline.transformer.register_forward_pre_hook(allocate_then_fail)
    gen.generate(PROMPT, height=256, width=256, steps=1, seed=0)
    assert sentinels and alive_at_retry == [False]


def test_oom_while_placing_moves_to_the_next_rung(tiny_checkpoint: Path) -> None:
    class Unplaceable(FullGPU):
        def apply(self, pipe: Any, hardware: Any) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory while placing (injected)")

    gen = generator(tiny_checkpoint, Unplaceable(device="cpu"))
    result = gen.generate(PROMPT, height=256, width=256, steps=1, seed=0)
    assert result.strategy == "cpu"
    assert [(f.before, f.phase) for f in result.fallbacks] == [("full_gpu", "place")]


def test_a_switch_leaves_in_place_what_both_strategies_keep_resident(tiny_checkpoint: Path) -> None:
    kept: list[list[str]] = []

    class Recording(FullGPU):
        def remove(self, pipe: Any, keep: Any = ()) -> None:
            kept.append(sorted(keep))
            super().remove(pipe, keep)

    gen = generator(tiny_checkpoint, Recording(device="cpu"))
    gen.generate(PROMPT, height=256, width=256, steps=1, seed=0)
    gen.switch(Hybrid(device="cpu"))
    assert kept == [["transformer", "vae"]]  # only the text encoder had to move
    gen.switch(StreamedOffload(device="cpu"))
    gen.switch("cpu")
    assert hooks_left(gen.pipeline) == []


# -- placements that fail for a reason other than memory ----------------------------------------------------------

MISMATCH = RuntimeError(
    "Expected all tensors to be on the same device, but got weight is on cuda:0, different from other tensors on "
    "cuda:1 (when checking argument for argument mat1 in method wrapper_CUDA_addmm)"
)


def test_a_placement_failing_on_first_use_gives_way_to_the_next_rung(
    tiny_checkpoint: Path, reference: Image.Image, inject: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    gen = generator(tiny_checkpoint, FullGPU(device="cpu"))
    gen.load()
    inject(gen.pipeline.transformer, lambda: isinstance(gen.strategy, FullGPU), MISMATCH)
    with caplog.at_level("WARNING", logger="zimage_turbo"):
        result = gen.generate(PROMPT, height=256, width=256, steps=4, seed=5)
    assert result.strategy == "cpu" and same(result.image, reference)
    [fallback] = result.fallbacks
    assert (fallback.kind, fallback.before, fallback.phase) == ("error", "full_gpu", "denoise")
    assert fallback.reason.startswith("RuntimeError: Expected all tensors to be on the same device")
    assert "full_gpu failed on its first use while denoising" in caplog.text
    # Marked unusable for this Generator: the next call does not try it again, and no hook is left behind.
    again = gen.generate(PROMPT, height=256, width=256, steps=4, seed=5)
    assert again.fallbacks == () and again.strategy == "cpu" and same(again.image, reference)
    assert hooks_left(gen.pipeline) == []
    # Asking for it by name clears the mark (and, still broken, it gives way again).
    gen.switch(FullGPU(device="cpu"))
    assert [f.kind for f in gen.generate(PROMPT, height=256, width=256, steps=1, seed=5).fallbacks] == ["error"]


def test_a_placement_failing_while_placed_or_decoding_gives_way_too(
    tiny_checkpoint: Path, inject: Callable[..., None]
) -> None:
    class Misplaced(Hybrid):
        def apply(self, pipe: Any, hardware: Any) -> None:
            super().apply(pipe, hardware)
            raise ValueError("a kernel this card cannot run (injected)")

    gen = generator(tiny_checkpoint, Misplaced(device="cpu"))
    result = gen.generate(PROMPT, height=256, width=256, steps=1, seed=0)
    assert result.strategy == "cpu" and hooks_left(gen.pipeline) == []
    # The first placement happens while loading: its failure is reported with the first result.
    assert [(f.kind, f.before, f.phase) for f in result.fallbacks] == [("error", "hybrid", "place")]

    gen = generator(tiny_checkpoint, StreamedOffload(device="cpu"))
    gen.load()
    inject(gen.pipeline.vae.decoder, lambda: isinstance(gen.strategy, StreamedOffload), MISMATCH)
    decoded = gen.generate(PROMPT, height=256, width=256, steps=2, seed=0)
    assert decoded.strategy == "cpu" and [(f.kind, f.phase) for f in decoded.fallbacks] == [("error", "decode")]


def test_a_placement_that_has_worked_fails_visibly(tiny_checkpoint: Path, inject: Callable[..., None]) -> None:
    gen = generator(tiny_checkpoint, FullGPU(device="cpu"))
    gen.generate(PROMPT, height=256, width=256, steps=1, seed=0)
    failing = [True]
    inject(gen.pipeline.transformer, lambda: failing[0], MISMATCH)
    with pytest.raises(RuntimeError, match="same device"):  # not the placement's first use: a bug to show
        gen.generate(PROMPT, height=256, width=256, steps=1, seed=0)
    failing[0] = False
    assert gen.generate(PROMPT, height=256, width=256, steps=1, seed=0).strategy == "full_gpu"


def test_when_every_rung_fails_a_typed_error_names_each(tiny_checkpoint: Path, inject: Callable[..., None]) -> None:
    gen = generator(tiny_checkpoint, FullGPU(device="cpu"), allow_downscale=True)
    gen.load()
    inject(gen.pipeline.transformer, lambda: True, MISMATCH)
    with pytest.raises(PlacementFailedError) as caught:
        gen.generate(PROMPT, height=256, width=256, steps=1, seed=0)
    assert [(f.kind, f.before) for f in caught.value.tried] == [("error", "full_gpu"), ("error", "cpu")]  # type: ignore[attr-defined]
    assert "full_gpu failed (denoise: RuntimeError: Expected all tensors" in str(caught.value)
    assert "downscale" not in str(caught.value)  # a smaller image would not help


def test_the_users_callback_and_our_own_errors_are_never_taken_for_a_broken_placement(
    tiny_checkpoint: Path,
) -> None:
    gen = generator(tiny_checkpoint, FullGPU(device="cpu"))

    def stop(_: Any) -> None:
        raise RuntimeError("stop here (the user's own error)")

    with pytest.raises(RuntimeError, match="user's own"):
        gen.generate(PROMPT, height=256, width=256, steps=2, seed=0, callback=stop)
    assert gen.generate(PROMPT, height=256, width=256, steps=1, seed=0).strategy == "full_gpu"
