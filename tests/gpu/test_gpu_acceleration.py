"""GPU tests of the speed-ups: attention kernels, regional compile, quantization (run them on a CUDA machine).

Every kernel and the compiled blocks must give the image of PyTorch's default attention within bf16 rounding;
quantization changes the image, and the test bounds by how much (the numbers for the docs come from
benchmarks/speed.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_turbo import GenerationResult, Generator, Hybrid, StreamedOffload, ZImageSettings
from zimage_turbo.speedups import attention
from zimage_turbo.speedups.attention import AttentionShape, attention_available, choose_attention, measure_attention
from zimage_turbo.strategies.base import host_homes

pytestmark = pytest.mark.gpu

PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"
SIZE = 512  # small images keep the suite fast; the kernels and graphs are the same at 1024


def _pixels(image: object) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.fixture(scope="module")
def generator(full_checkpoint: Path) -> Generator:
    settings = ZImageSettings(progress=False, attention="native", compile="off")
    return Generator(model=full_checkpoint, strategy="full_gpu", settings=settings).load()


@pytest.fixture(scope="module")
def reference(generator: Generator) -> np.ndarray:
    result = generator.generate(PROMPT, height=SIZE, width=SIZE, seed=3)
    assert result.attention == "native" and not result.compiled
    return _pixels(result.image)


def test_automatic_choice_is_the_fastest_exact_kernel() -> None:
    device = torch.device("cuda")
    shape = AttentionShape(1, 4096 + 128, 30, 128)
    attention._choices.clear()  # earlier tests in this process chose for this shape already
    chosen, seconds = choose_attention(device, torch.bfloat16, shape)
    assert seconds, "the first choice in a process measures"
    finite = {name: value for name, value in seconds.items() if math.isfinite(value)}
    assert "native" in finite and chosen == min(finite, key=lambda name: finite[name])
    # A second call reuses the measurement.
    assert choose_attention(device, torch.bfloat16, shape) == (chosen, {})
    # A kernel that is not installed is never a candidate.
    for name in ("flash_attn", "flash_attn_3"):
        if attention_available(name, device):
            assert measure_attention(device, torch.bfloat16, shape, (name,))[name] == math.inf


@pytest.mark.parametrize("kernel", ["flash", "cudnn", "efficient"])
def test_each_exact_kernel_gives_the_default_image(full_checkpoint: Path, reference: np.ndarray, kernel: str) -> None:
    settings = ZImageSettings(progress=False, attention=kernel, compile="off")
    with Generator(model=full_checkpoint, strategy="full_gpu", settings=settings) as generator:
        result = generator.generate(PROMPT, height=SIZE, width=SIZE, seed=3)
    assert result.attention == kernel
    image = _pixels(result.image)
    assert np.abs(image - reference).max() <= 12
    assert _psnr(image, reference) > 40


def test_compiled_parts_give_the_eager_image(
    full_checkpoint: Path, reference: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    # as in a user's process: importing torch._dynamo has set the variable to torch's own default folder
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    cache_dir()
    settings = ZImageSettings(progress=False, attention="native", compile="all", cache_dir=tmp_path)
    with Generator(model=full_checkpoint, strategy="full_gpu", settings=settings) as generator:
        first = generator.generate(PROMPT, height=SIZE, width=SIZE, seed=3)
        again = generator.generate(PROMPT, height=SIZE, width=SIZE, seed=3)
        # hybrid streams the text encoder: it must run eagerly there, the resident blocks stay compiled
        generator.switch(Hybrid())
        hybrid = generator.generate(PROMPT, height=SIZE, width=SIZE, seed=3)
    assert first.compiled == again.compiled == ("blocks", "text_encoder", "vae_decoder")
    assert "blocks" in hybrid.compiled and "text_encoder" not in hybrid.compiled
    for result in (first, again, hybrid):
        image = _pixels(result.image)
        difference = int(np.abs(image - reference).max())
        print(f"compiled {result.compiled} on {result.strategy}: max diff {difference}, "
              f"PSNR {_psnr(image, reference):.1f} dB against eager")  # fmt: skip
        assert difference <= 12 and _psnr(image, reference) > 40
    # each part's compile time was measured and recorded for the next Generator's decision
    records = json.loads(next(tmp_path.rglob("zimage-turbo-compile-times.json")).read_text())
    print("compile seconds:", records)
    assert len(records) == 3 and all(value > 0 for value in records.values())
    # and the kernels are in the library's cache folder, for the next process (not in torch's temporary default)
    kernels = tmp_path / "torch-compile" / "inductor"
    print("kernel cache:", sorted(entry.name for entry in kernels.iterdir()))
    assert any(path.is_file() for path in (kernels / "triton").rglob("*"))


def test_fp8_changes_the_image_a_little_and_switching_back_restores_bf16(
    full_checkpoint: Path, reference: np.ndarray
) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    settings = ZImageSettings(progress=False, attention="native", compile="off", quantization="fp8")
    before = torch.cuda.memory_allocated()  # the module's bf16 Generator is on the card too
    with Generator(model=full_checkpoint, strategy="full_gpu", settings=settings) as generator:
        quantized = generator.generate(PROMPT, height=SIZE, width=SIZE, seed=3)
        assert quantized.strategy == "full_gpu" and quantized.quantization == "fp8"
        held = torch.cuda.memory_allocated() - before
        generator.switch(Hybrid())  # an instance, not quantized: the bf16 weights come back from host memory
        lossless = generator.generate(PROMPT, height=SIZE, width=SIZE, seed=3)
    assert lossless.quantization is None
    assert np.abs(_pixels(lossless.image) - reference).max() <= 12
    # fp8 weights take about half the bytes of bf16 ones on the card (with TE and VAE resident: ~15 GiB)
    assert held < 17 * 2**30
    psnr = _psnr(_pixels(quantized.image), reference)
    largest = int(np.abs(_pixels(quantized.image) - reference).max())
    print(f"fp8 against bf16 at {SIZE}x{SIZE}: PSNR {psnr:.1f} dB, max diff {largest}")
    assert psnr > 15  # a visible but small change; docs give the number


def _resident_fp8_image(full_checkpoint: Path, settings: ZImageSettings) -> np.ndarray:
    """The image of the fp8 transformer kept on the GPU (full_gpu), to compare streamed fp8 with."""
    with Generator(model=full_checkpoint, strategy="full_gpu", settings=settings) as generator:
        return _pixels(generator.generate(PROMPT, height=SIZE, width=SIZE, seed=3).image)


def _generate_measuring_peak(generator: Generator) -> tuple[GenerationResult, int]:
    """One image, and the GPU memory it took at its peak beyond what was held before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = generator.generate(PROMPT, height=SIZE, width=SIZE, seed=3)
    return result, torch.cuda.max_memory_allocated() - before


def test_streamed_fp8_gives_the_resident_fp8_image_within_4_gib(full_checkpoint: Path, reference: np.ndarray) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    settings = ZImageSettings(progress=False, attention="native", compile="off", quantization="fp8")
    resident = _resident_fp8_image(full_checkpoint, settings)
    # A 4 GiB card, quantization left to the planner: it streams fp8 blocks.
    small = settings.model_copy(update={"quantization": "auto", "vram_budget_gib": 4.0})
    with Generator(model=full_checkpoint, settings=small) as generator:
        streamed, peak = _generate_measuring_peak(generator)
        homes = host_homes(generator.pipeline)
        pinned = homes.host_bytes
        generator.switch(StreamedOffload())  # an instance, not quantized: bf16 blocks from their own homes
        lossless = generator.generate(PROMPT, height=SIZE, width=SIZE, seed=3)
        freed = pinned - homes.host_bytes
    assert streamed.strategy == "streamed" and streamed.quantization == "fp8"
    largest = int(np.abs(_pixels(streamed.image) - resident).max())
    print(
        f"streamed fp8 against full_gpu fp8: max diff {largest}; GPU peak {peak / 2**30:.2f} GiB; "
        f"fp8 homes freed on the switch back {freed / 2**30:.2f} GiB"
    )
    assert largest <= 2  # the same quantized weights, only streamed
    assert peak < 4 * 2**30
    # Back in bf16. Fresh processes give streamed and full_gpu the same image (the harness: max diff 0), but
    # after the compiled and fp8 runs before it in this process bf16 images move by a few levels (6 seen here;
    # see the fp8 test above): the bound of the kernel tests.
    assert lossless.quantization is None and np.abs(_pixels(lossless.image) - reference).max() <= 12
    assert 4 * 2**30 < freed < 8 * 2**30  # the fp8 copies' pinned homes (about 6 GiB)


def test_streamed_fp8_with_compiled_layers_stays_close_to_eager_within_4_gib(
    full_checkpoint: Path, reference: np.ndarray
) -> None:
    """compile="on" with streamed fp8 blocks: the blocks run eagerly inside their hooks, their fp8 layers'
    arithmetic compiled (the ``fp8_linears`` part)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    settings = ZImageSettings(progress=False, attention="native", compile="off", quantization="fp8")
    resident = _resident_fp8_image(full_checkpoint, settings)
    small = settings.model_copy(update={"quantization": "auto", "vram_budget_gib": 4.0, "compile": "on"})
    with Generator(model=full_checkpoint, settings=small) as generator:
        result, peak = _generate_measuring_peak(generator)
    assert result.strategy == "streamed" and result.quantization == "fp8" and not result.fallbacks
    assert "fp8_linears" in result.compiled and "blocks" not in result.compiled
    compiled = _pixels(result.image)
    psnr = _psnr(compiled, resident)
    print(
        f"streamed fp8 with compiled layers against full_gpu fp8 eager: PSNR {psnr:.1f} dB, max diff "
        f"{int(np.abs(compiled - resident).max())}; GPU peak {peak / 2**30:.2f} GiB"
    )
    assert psnr > 30  # fp8 against bf16 is about 45 dB; fused rounding changes much less
    assert peak < 4 * 2**30
