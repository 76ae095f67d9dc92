"""The Generator on the tiny checkpoint, compared bit for bit with plain diffusers on the CPU."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_turbo import (
    Generator,
    GeneratorClosedError,
    InvalidRequestError,
    NumericalError,
    StrategyUnavailableError,
    UnknownStrategyError,
    ZImageSettings,
)
from zimage_turbo.generator import MAX_SEQUENCE_LENGTH, count_prompt_tokens


def plain_diffusers(
    path: Path,
    prompt: str,
    *,
    height: int,
    width: int,
    steps: int,
    seeds: list[int],
    guidance_scale: float = 0.0,
    negative_prompt: str | None = None,
) -> list[Image.Image]:
    """What a user would write by hand with diffusers (CPU generators: one per image)."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    output = pipe(
        prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        negative_prompt=negative_prompt,
        num_images_per_prompt=len(seeds),
        generator=generators[0] if len(generators) == 1 else generators,
    )
    return list(output.images)


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and bool(np.array_equal(np.asarray(a), np.asarray(b)))


@pytest.fixture(scope="module")
def generator(tiny_checkpoint: Path) -> Generator:
    return Generator(settings=ZImageSettings(model=str(tiny_checkpoint), progress=False))


@pytest.mark.parametrize(
    ("prompt", "height", "width", "steps", "seed"),
    [
        ("a red fox in the snow", 256, 256, 8, 0),
        ("a lighthouse at dusk, oil painting", 384, 512, 4, 123456789),
        ("一只在雪地里的狐狸", 512, 256, 9, 2**40),
    ],
)
def test_bit_identical_to_plain_diffusers(
    generator: Generator, tiny_checkpoint: Path, prompt: str, height: int, width: int, steps: int, seed: int
) -> None:
    ours = generator.generate(prompt, height=height, width=width, steps=steps, seed=seed)
    [theirs] = plain_diffusers(tiny_checkpoint, prompt, height=height, width=width, steps=steps, seeds=[seed])
    assert same(ours.image, theirs)
    assert np.asarray(ours.image).std() > 1  # not a flat image: the check has teeth


def test_batch_is_bit_identical_and_image_k_uses_seed_plus_k(generator: Generator, tiny_checkpoint: Path) -> None:
    batch = generator.generate("a bowl of fruit", height=256, width=256, seed=41, num_images=3)
    assert batch.seeds == (41, 42, 43)
    theirs = plain_diffusers(tiny_checkpoint, "a bowl of fruit", height=256, width=256, steps=8, seeds=[41, 42, 43])
    assert all(same(a, b) for a, b in zip(batch.images, theirs, strict=True))
    # Alone, seed 42 starts from the same noise; batched matmuls round differently, so the image agrees up to
    # float rounding, not bit for bit.
    alone = np.asarray(generator.generate("a bowl of fruit", height=256, width=256, seed=42).image).astype(int)
    in_batch = np.asarray(batch.images[1]).astype(int)
    assert np.abs(alone - in_batch).max() <= 2 and (alone != in_batch).mean() < 0.01
    assert not same(batch.images[0], batch.images[1])


def test_guidance_with_negative_prompt_is_bit_identical(generator: Generator, tiny_checkpoint: Path) -> None:
    ours = generator.generate(
        "a snowy station",
        height=256,
        width=256,
        steps=3,
        seed=9,
        guidance_scale=2.5,
        negative_prompt="blurry",
    )
    [theirs] = plain_diffusers(
        tiny_checkpoint,
        "a snowy station",
        height=256,
        width=256,
        steps=3,
        seeds=[9],
        guidance_scale=2.5,
        negative_prompt="blurry",
    )
    assert same(ours.image, theirs)
    assert ours.warnings == ()


def test_result_describes_the_run(generator: Generator) -> None:
    result = generator.generate("a cat", height=256, width=320, steps=2, seed=5)
    assert (result.width, result.height, result.steps) == (320, 256, 2)
    assert result.image.size == (320, 256)
    assert result.seed == 5 and result.seeds == (5,)
    assert result.strategy == ("full_gpu" if torch.cuda.is_available() else "cpu")
    assert result.dtype in ("float32", "bfloat16")
    assert result.timings.encode > 0 and result.timings.denoise > 0 and result.timings.decode > 0
    assert result.timings.total >= result.timings.denoise
    assert result.peak_memory["host"] > 0
    assert result.fallbacks == ()
    assert "seed=5" in repr(result)
    assert result._repr_png_().startswith(b"\x89PNG\r\n\x1a\n")


def test_load_time_is_reported_once(tiny_checkpoint: Path) -> None:
    gen = Generator(model=tiny_checkpoint, settings=ZImageSettings(progress=False))
    first = gen.generate("a cat", height=256, width=256, steps=1, seed=1)
    second = gen.generate("a cat", height=256, width=256, steps=1, seed=1)
    assert first.timings.load > 0 and second.timings.load == 0
    assert same(first.image, second.image)


def test_random_seed_is_reported_and_reproduces_the_image(generator: Generator) -> None:
    drawn = generator.generate("a dragon made of paper", height=256, width=256, steps=2)
    again = generator.generate("a dragon made of paper", height=256, width=256, steps=2, seed=drawn.seed)
    assert same(drawn.image, again.image)


def test_bad_input_fails_before_loading(tiny_checkpoint: Path) -> None:
    gen = Generator(model=tiny_checkpoint)
    for bad in (
        dict(height=1000),
        dict(steps=0),
        dict(num_images=0),
        dict(seed=-1),
        dict(guidance_scale=float("nan")),
    ):
        with pytest.raises(InvalidRequestError):
            gen.generate("a cat", **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        gen.generate("")
    assert not gen.is_loaded


def test_loading_is_lazy_unless_asked(tiny_checkpoint: Path) -> None:
    lazy = Generator(model=tiny_checkpoint)
    assert not lazy.is_loaded and lazy.strategy is None and "not loaded" in repr(lazy)
    eager = Generator(model=tiny_checkpoint, load=True)
    assert eager.is_loaded and eager.strategy is not None
    assert eager.model is not None and eager.model.source == "local"
    assert eager.pipeline is not None and eager.hardware is not None


def test_unknown_strategy_is_refused_at_construction(tiny_checkpoint: Path) -> None:
    with pytest.raises(UnknownStrategyError, match="full_gpu"):
        Generator(model=tiny_checkpoint, strategy="turbo")
    with pytest.raises(UnknownStrategyError, match="LoadStrategy"):
        Generator(model=tiny_checkpoint, strategy=42)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_full_gpu_without_a_gpu_says_so(tiny_checkpoint: Path) -> None:
    from zimage_turbo.hardware import detect_hardware

    if detect_hardware().mps:
        pytest.skip("an MPS device counts as a GPU")
    gen = Generator(model=tiny_checkpoint, strategy="full_gpu")
    with pytest.raises(StrategyUnavailableError, match="strategy='cpu'"):
        gen.generate("a cat", height=256, width=256)
    assert not gen.is_loaded


def test_generate_many_keeps_order_and_matches_single_calls(generator: Generator) -> None:
    prompts = ["a cat", "a dog", "a ship"]
    results = generator.generate_many(prompts, height=256, width=256, steps=2, seed=100)
    assert [r.prompt for r in results] == prompts
    assert [r.seed for r in results] == [100, 101, 102]
    for prompt, result in zip(prompts, results, strict=True):
        single = generator.generate(prompt, height=256, width=256, steps=2, seed=result.seed)
        assert same(single.image, result.image)
    chosen = generator.generate_many(["a cat", "a dog"], height=256, width=256, steps=1, seed=[7, 3])
    assert [r.seed for r in chosen] == [7, 3]
    numpy_seeded = generator.generate_many(["a cat"], height=256, width=256, steps=1, seed=np.int64(7))
    assert numpy_seeded[0].seed == 7 and same(numpy_seeded[0].image, chosen[0].image)


def test_generate_many_validates_everything_first(tiny_checkpoint: Path) -> None:
    gen = Generator(model=tiny_checkpoint)
    with pytest.raises(InvalidRequestError):
        gen.generate_many(["a cat", "   "])
    with pytest.raises(InvalidRequestError, match="list of prompts"):
        gen.generate_many("a cat")
    with pytest.raises(InvalidRequestError, match="2 seeds for 3 prompts"):
        gen.generate_many(["a", "b", "c"], seed=[1, 2])
    with pytest.raises(InvalidRequestError, match="seed"):
        gen.generate_many(["a", "b"], seed=True)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="seed"):
        gen.generate("a", seed=2.0)  # type: ignore[arg-type]
    assert not gen.is_loaded


def test_over_long_prompt_is_reported(generator: Generator) -> None:
    prompt = "a very detailed description of a busy market " * 60
    result = generator.generate(prompt, height=256, width=256, steps=1, seed=0)
    tokens = count_prompt_tokens(generator.pipeline.tokenizer, prompt)
    assert tokens > MAX_SEQUENCE_LENGTH
    [warning] = result.warnings
    assert f"{tokens} tokens" in warning and "512" in warning


def test_negative_prompt_without_guidance_is_reported(generator: Generator) -> None:
    result = generator.generate("a cat", height=256, width=256, steps=1, seed=0, negative_prompt="dogs")
    assert result.warnings == ("negative_prompt has no effect when guidance_scale is 0",)


def test_nan_latents_raise_instead_of_a_black_image(tiny_checkpoint: Path) -> None:
    gen = Generator(model=tiny_checkpoint, settings=ZImageSettings(progress=False), load=True)
    with torch.no_grad():
        gen.pipeline.transformer.all_final_layer["2-1"].linear.weight.fill_(float("nan"))
    with pytest.raises(NumericalError, match="NaN"):
        gen.generate("a cat", height=256, width=256, steps=1, seed=0)


def test_threads_share_one_generator_safely(generator: Generator) -> None:
    jobs = [(f"prompt number {i}", 1000 + i) for i in range(6)]
    expected = {seed: generator.generate(p, height=256, width=256, steps=2, seed=seed).image for p, seed in jobs}
    results: dict[int, Image.Image] = {}
    errors: list[BaseException] = []

    def work(prompt: str, seed: int) -> None:
        try:
            results[seed] = generator.generate(prompt, height=256, width=256, steps=2, seed=seed).image
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(same(results[seed], expected[seed]) for seed in expected)


def test_save_writes_every_image_atomically(generator: Generator, tmp_path: Path) -> None:
    single = generator.generate("a cat", height=256, width=256, steps=1, seed=0)
    [path] = single.save(tmp_path / "cat.png")
    assert same(Image.open(path), single.image)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any new file, not mkstemp's 0600
    batch = generator.generate("a cat", height=256, width=256, steps=1, seed=0, num_images=2)
    paths = batch.save(tmp_path / "cats.webp")
    assert [p.name for p in paths] == ["cats-0.webp", "cats-1.webp"]
    assert not list(tmp_path.glob(".*part"))
    before = path.read_bytes()
    with pytest.raises(InvalidRequestError, match="exists"):
        single.save(path)  # no overwrite unless asked, as the docs promise
    assert path.read_bytes() == before
    assert single.save(path, overwrite=True) == [path]
    with pytest.raises(InvalidRequestError, match="does not exist"):
        single.save(tmp_path / "missing" / "cat.png")
    with pytest.raises(InvalidRequestError, match="extension"):
        single.save(tmp_path / "cat")


def test_save_expands_the_home_folder_once(
    generator: Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    single = generator.generate("a cat", height=256, width=256, steps=1, seed=0)
    assert single.save("~/cat.png") == [tmp_path / "cat.png"]
    assert same(Image.open(tmp_path / "cat.png"), single.image)
    assert not (tmp_path / "~").exists()


def test_close_releases_and_forbids_further_use(tiny_checkpoint: Path) -> None:
    with Generator(model=tiny_checkpoint, load=True) as gen:
        assert gen.is_loaded
    assert not gen.is_loaded and repr(gen) == "Generator(closed)"
    with pytest.raises(GeneratorClosedError):
        gen.generate("a cat", height=256, width=256)
    # every other call says so too, instead of returning quietly or reading the model again
    for call in (lambda: gen.switch("cpu"), gen.plan, gen.load, lambda: gen.generate_many(["a cat"])):
        with pytest.raises(GeneratorClosedError):
            call()


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="checks a machine with fewer than two GPUs")
@pytest.mark.parametrize("name", ["multi_gpu", "multi_gpu_hybrid", "full_gpu"])
def test_a_gpu_strategy_without_its_gpus_is_unavailable(tiny_checkpoint: Path, name: str) -> None:
    if name == "full_gpu" and torch.cuda.is_available():
        pytest.skip("full_gpu runs here")
    gen = Generator(model=tiny_checkpoint, strategy=name, settings=ZImageSettings(progress=False))
    with pytest.raises(StrategyUnavailableError, match=name):
        gen.generate("a cat", height=256, width=256, steps=1)


@pytest.mark.quant
def test_an_explicit_quantization_the_placement_cannot_apply_is_a_warning(tiny_checkpoint: Path) -> None:
    settings = ZImageSettings(progress=False, quantization="int8")
    result = Generator(model=tiny_checkpoint, strategy="cpu", settings=settings).generate(
        "a cat", height=256, width=256, steps=1
    )
    assert result.quantization is None
    assert any("quantization='int8'" in warning and "cpu" in warning for warning in result.warnings)


def test_bfloat16_on_the_cpu(tiny_checkpoint: Path) -> None:
    gen = Generator(model=tiny_checkpoint, settings=ZImageSettings(dtype="bfloat16", strategy="cpu", progress=False))
    result = gen.generate("a cat", height=256, width=256, steps=2, seed=0)
    assert result.dtype == "bfloat16"
    assert gen.pipeline.transformer.dtype == torch.bfloat16
