"""diffusers' spellings of our arguments (torch_dtype, num_inference_steps, generator=...) and step previews."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_turbo import (
    FullGPU,
    Generator,
    InvalidRequestError,
    InvalidSettingsError,
    StepInfo,
    ZImageSettings,
    preview_image,
)

PROMPT = "a red fox in fresh snow at dawn"


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and bool(np.array_equal(np.asarray(a), np.asarray(b)))


def diffusers_images(path: Path, generator: Any, *, steps: int, images: int = 1) -> list[Image.Image]:
    """What a diffusers user gets for this generator (the same call the test then makes through us)."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    output = pipe(
        PROMPT,
        height=256,
        width=256,
        num_inference_steps=steps,
        guidance_scale=0.0,
        num_images_per_prompt=images,
        generator=generator,
    )
    return list(output.images)


@pytest.fixture(scope="module")
def gen(tiny_checkpoint: Path) -> Generator:
    return Generator(tiny_checkpoint, settings=ZImageSettings(progress=False))


@pytest.mark.parametrize(
    ("given", "name"), [(torch.bfloat16, "bfloat16"), (torch.float16, "float16"), (torch.float32, "float32")]
)
def test_settings_take_a_torch_dtype(given: torch.dtype, name: str) -> None:
    assert ZImageSettings(dtype=given).dtype == name
    assert ZImageSettings().replace(dtype=given).dtype == name


def test_a_dtype_the_model_cannot_run_in_is_refused() -> None:
    with pytest.raises(InvalidSettingsError, match="int8"):
        ZImageSettings(dtype=torch.int8)


def test_generator_takes_dtype_or_torch_dtype_but_not_both(tiny_checkpoint: Path) -> None:
    assert Generator(tiny_checkpoint, dtype=torch.float32).settings.dtype == "float32"
    assert Generator(tiny_checkpoint, torch_dtype="bfloat16").settings.dtype == "bfloat16"
    with pytest.raises(InvalidSettingsError, match=r"dtype.*torch_dtype"):
        Generator(tiny_checkpoint, dtype="float32", torch_dtype=torch.float32)
    with pytest.raises(InvalidSettingsError, match="int8"):
        Generator(tiny_checkpoint, torch_dtype=torch.int8)


def test_from_pretrained_splits_settings_from_generator_options(tiny_checkpoint: Path) -> None:
    gen = Generator.from_pretrained(
        tiny_checkpoint, torch_dtype=torch.float32, strategy="cpu", progress=False, device="cpu", offline=True
    )
    expected = ZImageSettings(model=str(tiny_checkpoint), dtype="float32", progress=False, offline=True)
    assert gen.settings == expected.replace(strategy="auto")
    assert gen.device == torch.device("cpu") and not gen.is_loaded
    assert gen.generate("a red fox", height=256, width=256, steps=1, seed=3).strategy == "cpu"
    based = Generator.from_pretrained(tiny_checkpoint, settings=ZImageSettings(progress=False), dtype="float32")
    assert based.settings.progress is False and based.settings.dtype == "float32"


def test_from_pretrained_refuses_an_unknown_option_listing_the_known_ones(tiny_checkpoint: Path) -> None:
    with pytest.raises(InvalidSettingsError, match=r"variant.*known options: .*cache_dir.*torch_dtype"):
        Generator.from_pretrained(tiny_checkpoint, variant="fp16")


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ({"steps": 2}, {"num_inference_steps": 2}),
        ({"num_images": 1}, {"num_images_per_prompt": 1}),
        ({"seed": 1}, {"generator": torch.Generator().manual_seed(1)}),
    ],
)
def test_one_spelling_per_argument_before_anything_loads(
    tiny_checkpoint: Path, ours: dict[str, Any], theirs: dict[str, Any]
) -> None:
    fresh = Generator(tiny_checkpoint, settings=ZImageSettings(progress=False))
    [our_name], [their_name] = ours, theirs
    with pytest.raises(InvalidRequestError, match=rf"{our_name}.*{their_name}"):
        fresh.generate(PROMPT, height=256, width=256, **ours, **theirs)
    with pytest.raises(InvalidRequestError, match=rf"{our_name}.*{their_name}"):
        fresh.generate_many([PROMPT], height=256, width=256, **ours, **theirs)
    assert not fresh.is_loaded


def test_diffusers_names_for_steps_and_images_mean_ours(gen: Generator) -> None:
    theirs = gen.generate(PROMPT, height=256, width=256, num_inference_steps=2, num_images_per_prompt=2, seed=9)
    ours = gen.generate(PROMPT, height=256, width=256, steps=2, num_images=2, seed=9)
    assert theirs.steps == 2 and theirs.seeds == (9, 10)
    assert all(same(a, b) for a, b in zip(theirs.images, ours.images, strict=True))


def test_a_torch_generator_gives_diffusers_image_and_no_seed(gen: Generator, tiny_checkpoint: Path) -> None:
    mine = torch.Generator().manual_seed(1234)
    result = gen.generate(PROMPT, height=256, width=256, num_inference_steps=2, generator=mine)
    theirs_generator = torch.Generator().manual_seed(1234)
    [theirs] = diffusers_images(tiny_checkpoint, theirs_generator, steps=2)
    assert same(result.image, theirs) and np.asarray(theirs).std() > 1
    assert torch.equal(mine.get_state(), theirs_generator.get_state())  # drawn from exactly as much
    assert result.seeds == (None,) and result.seed is None
    assert any("torch.Generator" in warning for warning in result.warnings)


def test_one_generator_per_image(gen: Generator, tiny_checkpoint: Path) -> None:
    result = gen.generate(
        PROMPT,
        height=256,
        width=256,
        steps=1,
        num_images=2,
        generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)],
    )
    theirs = diffusers_images(
        tiny_checkpoint, [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)], steps=1, images=2
    )
    assert result.seeds == (None, None)
    assert all(same(a, b) for a, b in zip(result.images, theirs, strict=True))
    with pytest.raises(InvalidRequestError, match="one per image"):
        gen.generate(PROMPT, height=256, width=256, steps=1, num_images=2, generator=[torch.Generator()])


@pytest.fixture
def inject() -> Iterator[Callable[..., None]]:
    handles: list[Any] = []

    def install(module: torch.nn.Module, when: Callable[[], bool]) -> None:
        def hook(*_: Any) -> None:
            if when():
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        handles.append(module.register_forward_pre_hook(hook))

    yield install
    for handle in handles:
        handle.remove()


def test_a_retry_on_another_rung_reuses_the_generators_noise(
    tiny_checkpoint: Path, inject: Callable[..., None]
) -> None:
    fresh = Generator(tiny_checkpoint, strategy=FullGPU(device="cpu"), settings=ZImageSettings(progress=False))
    fresh.load()
    inject(fresh.pipeline.transformer, lambda: isinstance(fresh.strategy, FullGPU))
    mine = torch.Generator().manual_seed(77)
    result = fresh.generate(PROMPT, height=256, width=256, steps=2, generator=mine)
    assert [fallback.phase for fallback in result.fallbacks] == ["denoise"] and result.strategy == "cpu"
    theirs_generator = torch.Generator().manual_seed(77)
    [theirs] = diffusers_images(tiny_checkpoint, theirs_generator, steps=2)
    assert same(result.image, theirs)
    assert torch.equal(mine.get_state(), theirs_generator.get_state())  # drawn from once, not once per rung


def test_the_callback_sees_each_steps_latents_and_timestep_and_the_image_is_unchanged(
    gen: Generator, tiny_checkpoint: Path
) -> None:
    seen: list[tuple[int, float, torch.Tensor]] = []
    previews: list[Image.Image] = []

    def keep(info: StepInfo) -> None:
        assert info.latents is not None
        seen.append((info.step, info.timestep, info.latents.clone()))
        previews.append(info.preview(size=64))

    watched = gen.generate(PROMPT, height=256, width=256, steps=2, num_images=2, seed=5, callback=keep)
    plain = gen.generate(PROMPT, height=256, width=256, steps=2, num_images=2, seed=5)
    assert all(same(a, b) for a, b in zip(watched.images, plain.images, strict=True))  # reading changes nothing
    assert [step for step, _, _ in seen] == [1, 2]
    assert 1000 >= seen[0][1] > seen[1][1] >= 0  # the scheduler's timesteps, falling
    assert all(latents.shape == (2, 16, 32, 32) and latents.dtype == torch.float32 for _, _, latents in seen)
    assert not torch.equal(seen[0][2], seen[1][2])
    # the last step's latents are what the VAE decodes: decoding them by hand gives the image
    pipe = gen.pipeline
    vae = pipe.vae
    with torch.inference_mode():
        decoded = vae.decode(seen[-1][2] / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    by_hand = pipe.image_processor.postprocess(decoded, output_type="pil")
    assert all(same(a, b) for a, b in zip(by_hand, plain.images, strict=True))
    assert all(p.size == (64, 64) and p.mode == "RGB" for p in previews)


def test_preview_image_is_a_small_deterministic_rgb_picture() -> None:
    latents = torch.randn(2, 16, 96, 64, generator=torch.Generator().manual_seed(0))
    before = latents.clone()
    first = preview_image(latents)
    assert first.mode == "RGB" and first.size == (171, 256)  # the longer side is `size`, the aspect kept
    assert torch.equal(latents, before)  # only read
    assert same(first, preview_image(latents.clone()))
    assert not same(first, preview_image(latents, index=1))
    assert preview_image(latents[0], size=32).size == (21, 32)
    pixels = np.asarray(first)
    assert pixels.std() > 10  # stretched to the full range before scaling up: not a grey wash
    with pytest.raises(InvalidRequestError, match="index"):
        preview_image(latents, index=2)
    with pytest.raises(InvalidRequestError, match="weights"):
        preview_image(latents, weights=torch.ones(4, 3))
