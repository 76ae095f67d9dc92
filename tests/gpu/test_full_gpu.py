"""GPU tests: run them on a CUDA machine (`make gpu-test`, or `pytest -m gpu tests/gpu`).

The full-size checkpoint takes about a minute to build on an H100/H200. Set ZIMAGE_TEST_FULL_CHECKPOINT to
a folder made by `zimage-turbo make-checkpoint full DIR` to reuse one; otherwise each session builds its own.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_turbo import Generator, ZImageSettings, check_pipeline_dir
from zimage_turbo.hardware import GIB

pytestmark = pytest.mark.gpu

PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"


def _pixels(image: object) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _plain_diffusers_image(path: Path, dtype: torch.dtype, *, height: int, width: int, steps: int, seed: int) -> object:
    """What a user writes by hand: from_pretrained, .to("cuda"), a CPU generator."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(path, dtype=dtype).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        PROMPT,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    del pipe
    torch.cuda.empty_cache()
    return image


def test_full_checkpoint_is_complete_and_real_sized(full_checkpoint: Path) -> None:
    layout = check_pipeline_dir(full_checkpoint)
    sizes = {c: sum(p.stat().st_size for p in layout.weight_paths(c)) / 1e9 for c in layout.weight_files}
    assert sizes["transformer"] == pytest.approx(12.31, abs=0.05)  # 6.15 B parameters in bf16
    assert sizes["text_encoder"] == pytest.approx(8.04, abs=0.05)  # 4.02 B
    assert sizes["vae"] == pytest.approx(0.168, abs=0.01)  # 84 M


def test_full_gpu_1024_matches_plain_diffusers(full_checkpoint: Path) -> None:
    generator = Generator(model=full_checkpoint, strategy="full_gpu", settings=ZImageSettings(progress=False))
    result = generator.generate(PROMPT, height=1024, width=1024, seed=42)
    assert result.strategy == "full_gpu" and result.device == "cuda:0" and result.dtype == "bfloat16"
    assert result.image.size == (1024, 1024)
    assert result.timings.load > 0
    # Weights (20.5 GB) plus activations: the reference run of plain diffusers peaked at 21.7 GiB.
    assert 19 * GIB < result.peak_memory["cuda:0"] < 26 * GIB
    assert all(p.device.type == "cuda" for p in generator.pipeline.transformer.parameters())

    theirs = _plain_diffusers_image(full_checkpoint, torch.bfloat16, height=1024, width=1024, steps=8, seed=42)
    difference = np.abs(_pixels(result.image) - _pixels(theirs))
    print(f"full_gpu vs plain diffusers: max abs diff {difference.max()}, mean {difference.mean():.4f}")
    # Same weights, same kernels, same noise: expected bit-identical; allow rounding-level noise at most.
    assert difference.mean() < 0.5 and difference.max() <= 8


def test_strategy_remove_and_apply_round_trip_on_gpu(tiny_checkpoint: Path) -> None:
    generator = Generator(model=tiny_checkpoint, strategy="full_gpu", settings=ZImageSettings(progress=False))
    first = generator.generate(PROMPT, height=512, width=512, seed=3)
    strategy, pipe = generator.strategy, generator.pipeline
    assert strategy is not None and generator.hardware is not None
    strategy.remove(pipe)
    assert all(p.device.type == "cpu" for p in pipe.transformer.parameters())
    assert all(p.device.type == "cpu" for p in pipe.text_encoder.parameters())
    strategy.apply(pipe, generator.hardware)
    second = generator.generate(PROMPT, height=512, width=512, seed=3)
    assert np.array_equal(_pixels(first.image), _pixels(second.image))


def test_tiny_on_gpu_matches_plain_diffusers_on_gpu(tiny_checkpoint: Path) -> None:
    ours = Generator(model=tiny_checkpoint, settings=ZImageSettings(progress=False, dtype="float32"))
    result = ours.generate(PROMPT, height=512, width=384, steps=5, seed=11)
    assert result.strategy == "full_gpu"
    theirs = _plain_diffusers_image(tiny_checkpoint, torch.float32, height=512, width=384, steps=5, seed=11)
    assert np.abs(_pixels(result.image) - _pixels(theirs)).max() <= 1


def test_close_gives_the_memory_back(tiny_checkpoint: Path) -> None:
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    generator = Generator(model=tiny_checkpoint, strategy="full_gpu", settings=ZImageSettings(progress=False))
    generator.generate(PROMPT, height=512, width=512, seed=0)
    assert torch.cuda.memory_allocated() > baseline
    generator.close()
    assert torch.cuda.memory_allocated() - baseline < 64 * 2**20


def test_detection_sees_the_per_process_cap() -> None:
    """mem_get_info ignores set_per_process_memory_fraction; detect_hardware must not (fresh process)."""
    script = textwrap.dedent(
        """
        import torch
        from zimage_turbo import detect_hardware
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(16 * 2**30 / total, 0)
        free_driver = torch.cuda.mem_get_info(0)[0]
        gpu = detect_hardware().gpus[0]
        budget = detect_hardware(vram_budget_bytes=6 * 2**30).gpus[0]
        print(free_driver, gpu.free_bytes, gpu.memory_fraction, budget.free_bytes)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    driver_free, usable, fraction, budgeted = (float(x) for x in run.stdout.split())
    print(f"driver says {driver_free / GIB:.1f} GiB free; usable under a 16 GiB cap: {usable / GIB:.2f} GiB")
    assert driver_free > 20 * GIB
    assert 15 * GIB < usable <= 16 * GIB
    assert fraction < 1
    assert 5 * GIB < budgeted <= 6 * GIB


def test_weights_read_ahead_into_the_gpu_equal_those_read_into_the_built_modules(tiny_checkpoint: Path) -> None:
    """The early reads (zimage_turbo.early_read) on CUDA: a background thread's copies through its own streams give
    the module the values a read into the built module gives (here: into host memory, then moved)."""
    from zimage_turbo.early_read import EarlyReads
    from zimage_turbo.host import HostHomes
    from zimage_turbo.loader import load_pipeline

    layout = check_pipeline_dir(tiny_checkpoint)
    cuda = torch.device("cuda", 0)
    targets = {name: cuda for name in ("transformer", "text_encoder", "vae")}
    read_ahead: list[EarlyReads] = []
    original = EarlyReads.__init__

    def remember(self: EarlyReads, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        read_ahead.append(self)

    EarlyReads.__init__ = remember  # type: ignore[method-assign]
    try:
        ahead = load_pipeline(layout, dtype=torch.bfloat16, targets=targets, homes=HostHomes(pin=False), progress=False)
    finally:
        EarlyReads.__init__ = original  # type: ignore[method-assign]
    assert [name for name, _, _ in read_ahead[0]._jobs] == ["transformer", "text_encoder", "vae"]
    homes = load_pipeline(layout, dtype=torch.bfloat16, targets={}, homes=HostHomes(pin=False), progress=False)
    for name in targets:
        mine, reference = getattr(ahead, name).state_dict(), getattr(homes, name).state_dict()
        assert all(tensor.device == cuda for tensor in mine.values())
        assert all(torch.equal(mine[key].cpu(), value) for key, value in reference.items()), name
