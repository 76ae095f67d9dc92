"""Faults in the middle of a generation, on the tiny checkpoint and the CPU.

After each fault the Generator must be usable: its lock free, its strategy's hooks as a fresh ``apply()``
leaves them, and its next image the one a fresh Generator makes. Out-of-memory errors are real
``torch.OutOfMemoryError`` exceptions raised from inside the pipeline (the GPU suite forces real ones);
tests/test_ladder.py covers which rung follows which, this file what the Generator looks like afterwards.
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

import zimage_turbo.tasks as tasks_module
from test_ladder import hooks_left
from zimage_turbo import (
    CPUOnly,
    DeviceFailedError,
    FullGPU,
    GenerationInterruptedError,
    Generator,
    Hybrid,
    InvalidRequestError,
    ModelCPUOffload,
    StepInfo,
    ZImageError,
    ZImageSettings,
)
from zimage_turbo.failures import is_device_failure, is_out_of_memory
from zimage_turbo.strategies.base import LoadStrategy

PROMPT = "a lighthouse in a storm, oil painting"
SEED = 11
STEPS = 2
SIZE = {"height": 256, "width": 256}


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and bool(np.array_equal(np.asarray(a), np.asarray(b)))


def make(checkpoint: Path, strategy: Any) -> Generator:
    return Generator(model=checkpoint, strategy=strategy, settings=ZImageSettings(progress=False))


def run(gen: Generator, **kwargs: Any) -> Any:
    return gen.generate(PROMPT, steps=STEPS, seed=SEED, **SIZE, **kwargs)


@pytest.fixture(scope="module")
def twin(tiny_checkpoint: Path) -> Image.Image:
    """The image a fresh Generator makes (every strategy gives the same on the CPU: see test_ladder.py)."""
    return run(make(tiny_checkpoint, "cpu")).image


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts VAE decodes: an interrupted generation must decode nothing."""
    calls: list[int] = []
    original = tasks_module.decode

    def counted(pipe: Any, latents: torch.Tensor, device: torch.device | None = None) -> list[Any]:
        calls.append(latents.shape[0])
        return original(pipe, latents, device)

    monkeypatch.setattr(tasks_module, "decode", counted)
    return calls


@pytest.fixture
def inject() -> Iterator[Callable[..., None]]:
    """Raise ``error`` from a module's forward pre-hook when ``when()`` says so."""
    handles: list[Any] = []

    def install(module: torch.nn.Module, when: Callable[[], bool], error: BaseException) -> None:
        def hook(*_: Any) -> None:
            if when():
                raise error

        handles.append(module.register_forward_pre_hook(hook))

    yield install
    for handle in handles:
        handle.remove()


def once() -> Callable[[], bool]:
    fired = [False]

    def when() -> bool:
        if fired[0]:
            return False
        fired[0] = True
        return True

    return when


def assert_usable(gen: Generator, twin: Image.Image) -> None:
    """Lock free, and the next generation is the fresh Generator's image, with no fallback."""
    assert gen._guard.lock.acquire(timeout=1)
    gen._guard.lock.release()
    again = run(gen)
    assert same(again.image, twin)
    assert again.fallbacks == ()


def hook_signature(gen: Generator) -> list[str]:
    """The hooks installed, by module and kind (what a fresh apply() of the same strategy installs)."""
    return sorted(hooks_left(gen.pipeline))


# -- out of memory at each phase ---------------------------------------------------------------------------


class _FailsToPlaceOnce(ModelCPUOffload):
    placed = 0

    def apply(self, pipe: Any, hardware: Any) -> None:
        type(self).placed += 1
        if type(self).placed == 1:
            raise torch.OutOfMemoryError("CUDA out of memory while placing (injected)")
        super().apply(pipe, hardware)


@pytest.mark.parametrize("phase", ["place", "encode", "denoise", "decode"])
def test_out_of_memory_at_each_phase_leaves_the_generator_usable(
    tiny_checkpoint: Path, twin: Image.Image, inject: Callable[..., None], phase: str
) -> None:
    if phase == "place":
        _FailsToPlaceOnce.placed = 0
        gen = make(tiny_checkpoint, _FailsToPlaceOnce(device="cpu"))
    else:
        gen = make(tiny_checkpoint, ModelCPUOffload(device="cpu"))
    gen.load()
    oom = torch.OutOfMemoryError(f"CUDA out of memory while {phase} (injected)")
    if phase == "encode":
        inject(gen.pipeline.text_encoder, once(), oom)
    elif phase == "denoise":
        # the second transformer pass: the retry must start again from the seed's noise, not from step 1
        passes = [0]

        def second_pass() -> bool:
            passes[0] += 1
            return passes[0] == 2

        inject(gen.pipeline.transformer, second_pass, oom)
    elif phase == "decode":
        inject(gen.pipeline.vae.decoder, once(), oom)
    result = run(gen)
    assert same(result.image, twin)
    [fallback] = result.fallbacks
    assert fallback.phase == phase and "injected" in fallback.reason
    if phase == "decode":
        assert fallback.kind == "vae_tiling" and result.strategy == "model_offload"
    else:
        assert fallback.before == "model_offload" and result.strategy == "cpu"
        assert hooks_left(gen.pipeline) == []  # the offload hooks went with the strategy
    assert_usable(gen, twin)


def test_a_fallback_after_step_k_restarts_the_steps_under_the_next_strategy(
    tiny_checkpoint: Path, twin: Image.Image, inject: Callable[..., None]
) -> None:
    gen = make(tiny_checkpoint, FullGPU(device="cpu"))
    gen.load()
    passes = [0]

    def second_pass() -> bool:
        passes[0] += 1
        return passes[0] == 2

    inject(gen.pipeline.transformer, second_pass, torch.OutOfMemoryError("CUDA out of memory (injected)"))
    seen: list[StepInfo] = []
    result = run(gen, callback=seen.append)
    assert same(result.image, twin)
    assert [(s.step, s.strategy) for s in seen] == [(1, "full_gpu"), (1, "cpu"), (2, "cpu")]


# -- the user's callback -----------------------------------------------------------------------------------


def test_the_callback_sees_every_step(tiny_checkpoint: Path) -> None:
    gen = make(tiny_checkpoint, "cpu")
    seen: list[StepInfo] = []
    gen.generate_many(["a cat", "a dog"], steps=2, seed=1, callback=seen.append, **SIZE)
    assert seen == [
        StepInfo(1, 2, "a cat", 0, "cpu"),
        StepInfo(2, 2, "a cat", 0, "cpu"),
        StepInfo(1, 2, "a dog", 1, "cpu"),
        StepInfo(2, 2, "a dog", 1, "cpu"),
    ]


STRATEGIES: list[Callable[[], LoadStrategy]] = [
    CPUOnly,
    lambda: ModelCPUOffload(device="cpu"),
    lambda: Hybrid(device="cpu"),
]


@pytest.mark.parametrize("error", [ValueError("stop at step 2"), KeyboardInterrupt(), torch.OutOfMemoryError("mine")])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=["cpu", "model_offload", "hybrid"])
def test_what_the_callback_raises_reaches_the_caller_unchanged(
    tiny_checkpoint: Path,
    twin: Image.Image,
    decodes: list[int],
    strategy: Callable[[], LoadStrategy],
    error: BaseException,
) -> None:
    gen = make(tiny_checkpoint, strategy())
    gen.load()
    fresh_hooks = hook_signature(gen)
    placed = gen.strategy

    def stop(info: StepInfo) -> None:
        if info.step == 2:
            raise error

    with pytest.raises(type(error)) as caught:
        run(gen, callback=stop)
    assert caught.value is error  # not wrapped, not replaced
    assert decodes == []  # the half-denoised latents were not decoded
    # Not taken for an out-of-memory error of ours: no fallback, the same strategy, nothing marked unplaceable.
    assert gen.strategy == placed and gen._placement is not None and gen._placement.unplaceable == set()
    assert hook_signature(gen) == fresh_hooks
    assert_usable(gen, twin)


def test_an_interrupt_inside_a_streamed_forward_resets_the_hooks(
    tiny_checkpoint: Path, twin: Image.Image, decodes: list[int]
) -> None:
    # Hybrid streams the text encoder block by block. Stopping inside block 1 leaves that block onloaded and
    # never offloaded (on a GPU: its weights stuck in GPU memory); the Generator must install fresh hooks.
    gen = make(tiny_checkpoint, Hybrid(device="cpu"))
    gen.load()
    fresh_hooks = hook_signature(gen)
    registry = gen.pipeline.text_encoder.layers[1]._diffusers_hook
    before = registry.get_hook("group_offloading")

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    handle = gen.pipeline.text_encoder.layers[1].self_attn.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(gen)
    handle.remove()
    assert decodes == []
    after = gen.pipeline.text_encoder.layers[1]._diffusers_hook.get_hook("group_offloading")
    assert after is not None and after is not before  # removed and applied again
    assert hook_signature(gen) == fresh_hooks
    homes = gen.pipeline._zimage_turbo_homes
    streamed = [p for p in gen.pipeline.text_encoder.layers.parameters()]
    assert homes.has_home(streamed)
    assert all(p.data.data_ptr() == homes._homes[id(p)].data_ptr() for p in streamed)  # every block at home
    assert_usable(gen, twin)


def test_the_callback_does_not_keep_the_failed_frames_alive(tiny_checkpoint: Path, twin: Image.Image) -> None:
    gen = make(tiny_checkpoint, "cpu")
    sentinel: list[weakref.ref[torch.Tensor]] = []

    def stop(info: StepInfo) -> None:
        scratch = torch.empty(1 << 16)  # stands for the activations of the interrupted step
        sentinel.append(weakref.ref(scratch))
        raise ValueError("stop")

    with pytest.raises(ValueError):
        run(gen, callback=stop)
    gc.collect()
    assert sentinel and sentinel[0]() is None  # the Generator holds no reference to the exception
    assert not {"_callback", "_callback_error"} & set(vars(gen))  # per-call state lives in the call, not here
    assert_usable(gen, twin)


def test_diffusers_interrupt_flag_stops_without_decoding(
    tiny_checkpoint: Path, twin: Image.Image, decodes: list[int]
) -> None:
    gen = make(tiny_checkpoint, "cpu")
    gen.load()

    def interrupt(info: StepInfo) -> None:
        if info.step == 1:
            gen.pipeline._interrupt = True  # diffusers' documented way to stop its loop

    with pytest.raises(GenerationInterruptedError, match="after 1 of 2 steps"):
        run(gen, callback=interrupt)
    assert decodes == []  # diffusers would have decoded the half-denoised latents
    assert_usable(gen, twin)


def test_calling_the_generator_from_its_own_callback_is_refused_not_a_deadlock(
    tiny_checkpoint: Path, twin: Image.Image
) -> None:
    gen = make(tiny_checkpoint, "cpu")
    for reentry in (
        lambda: gen.generate("again", steps=1, **SIZE),
        lambda: gen.switch("cpu"),
        lambda: gen.plan(),
        gen.close,
    ):

        def call_back(info: StepInfo, reentry: Callable[[], object] = reentry) -> None:
            reentry()

        with pytest.raises(InvalidRequestError, match="inside its own callback"):
            run(gen, callback=call_back)
    assert_usable(gen, twin)


# -- CUDA errors that are not out-of-memory -------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.",
    ],
)
def test_a_cuda_error_is_not_retried_and_the_generator_refuses_further_work(
    tiny_checkpoint: Path, inject: Callable[..., None], message: str
) -> None:
    gen = make(tiny_checkpoint, FullGPU(device="cpu"))
    gen.load()
    error = RuntimeError(message)
    tried: list[str] = []
    placement = gen._placement
    assert placement is not None
    original = placement.use
    placement.use = lambda rung: (tried.append(rung.name), original(rung))[1]  # type: ignore[method-assign]
    inject(gen.pipeline.transformer, lambda: True, error)
    with pytest.raises(RuntimeError) as caught:
        run(gen)
    assert caught.value is error  # the original, unchanged
    assert tried == ["full_gpu"]  # no other strategy was tried: the CUDA context would be poisoned
    for later in (lambda: run(gen), lambda: gen.switch("cpu"), gen.load):
        with pytest.raises(DeviceFailedError, match="Restart the process") as refused:
            later()
        assert first_line_of(message) in str(refused.value)
        assert isinstance(refused.value, ZImageError) and isinstance(refused.value, RuntimeError)
    gen.close()  # still possible: drops the references without touching the device
    assert not gen.is_loaded


def first_line_of(text: str) -> str:
    return text.splitlines()[0]


@pytest.mark.parametrize(
    ("error", "memory", "device"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True, False),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), True, False),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True, False),
        (RuntimeError("CUDA error: out of memory"), True, False),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False, True),
        (RuntimeError("CUDA error: device-side assert triggered"), False, True),
        (RuntimeError("CUDA error: unspecified launch failure"), False, True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"), False, True),
        (RuntimeError("Expected all tensors to be on the same device"), False, False),
        (ValueError("CUDA error: not really"), False, False),
        (KeyboardInterrupt(), False, False),
    ],
)
def test_errors_are_classified(error: BaseException, memory: bool, device: bool) -> None:
    assert is_out_of_memory(error) is memory
    assert is_device_failure(error) is device
