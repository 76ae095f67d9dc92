"""Image-to-image and inpainting on the tiny checkpoint, compared bit for bit with diffusers' own pipelines.

The reference is what a user writes by hand: ``ZImageImg2ImgPipeline`` / ``ZImageInpaintPipeline`` loaded with
``from_pretrained`` and called with a seeded CPU generator. Ours runs the same maths split into phases (the
VAE encoder over the inputs is a phase of its own), under every placement that runs on a CPU, after switches,
and after out-of-memory errors injected in each phase.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from test_generator import same
from test_ladder import every_strategy
from zimage_turbo import (
    CPUOnly,
    FullGPU,
    Generator,
    InvalidImageError,
    StepInfo,
    StreamedOffload,
    ZImageSettings,
    read_metadata,
)
from zimage_turbo.batch import Manifest, run_batch
from zimage_turbo.cli import main
from zimage_turbo.errors import BatchConflictError

PROMPT = "a harbour at dawn, oil painting"
SIZE = 256


def picture(width: int = SIZE, height: int = SIZE) -> Image.Image:
    """A picture with structure (gradients) and detail (noise), so that the encoder's output matters."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(width + height)
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    return Image.fromarray(np.clip(rgb + rng.integers(-30, 30, rgb.shape), 0, 255).astype(np.uint8))


def square_mask(width: int = SIZE, height: int = SIZE) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return picture()


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    return square_mask()


@pytest.fixture(scope="module")
def references(tiny_checkpoint: Path) -> dict[str, Any]:
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline

    pipes = {
        "image_to_image": ZImageImg2ImgPipeline.from_pretrained(tiny_checkpoint),
        "inpaint": ZImageInpaintPipeline.from_pretrained(tiny_checkpoint),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def diffusers_images(
    pipes: dict[str, Any],
    image: Image.Image,
    *,
    seeds: list[int] | None = None,
    generator: torch.Generator | None = None,
    mask_image: Image.Image | None = None,
    **arguments: Any,
) -> tuple[list[Image.Image], int]:
    """The images diffusers makes (CPU generators, one per image), and the transformer passes it ran."""
    pipe = pipes["inpaint" if mask_image is not None else "image_to_image"]
    if mask_image is not None:
        arguments["mask_image"] = mask_image
    if generator is None:
        assert seeds is not None
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        generator = generators[0] if len(generators) == 1 else generators  # type: ignore[assignment]
        arguments["num_images_per_prompt"] = len(generators)
    output = pipe(PROMPT, image=image, generator=generator, **arguments)
    return list(output.images), int(pipe._num_timesteps)


@pytest.fixture(scope="module")
def generator(tiny_checkpoint: Path) -> Generator:
    return Generator(model=tiny_checkpoint, settings=ZImageSettings(progress=False))


@pytest.fixture(scope="module")
def reference_run(references: dict[str, Any], image: Image.Image) -> tuple[Image.Image, int]:
    """diffusers' image-to-image at strength 0.6 over 4 steps, seed 5, and the passes it ran (3)."""
    [made], passes = diffusers_images(
        references, image, seeds=[5], strength=0.6, num_inference_steps=4, guidance_scale=0.0
    )
    return made, passes


@pytest.fixture(scope="module")
def reference(reference_run: tuple[Image.Image, int]) -> Image.Image:
    return reference_run[0]


def test_image_to_image_equals_diffusers_and_the_result_says_how(
    generator: Generator, reference_run: tuple[Image.Image, int], image: Image.Image, tmp_path: Path
) -> None:
    reference, passes = reference_run
    steps: list[StepInfo] = []
    ours = generator.generate(PROMPT, image=image, steps=4, seed=5, callback=steps.append)
    assert same(ours.image, reference)
    assert np.asarray(ours.image).std() > 1  # not flat: the comparison has teeth
    assert [info.step for info in steps] == [1, 2, 3] and {info.steps for info in steps} == {passes}
    assert (ours.task, ours.strength, dict(ours.input_sizes)) == ("image_to_image", 0.6, {"image": (256, 256)})
    assert ours.timings.encode_image > 0 and ours.timings.work >= ours.timings.encode_image
    assert ours.warnings == () and ours.fallbacks == ()
    [saved] = ours.save(tmp_path / "out.png")
    stored = read_metadata(saved)
    assert stored is not None
    assert (stored["task"], stored["strength"], stored["input_sizes"]) == ("image_to_image", 0.6, {"image": "256x256"})
    # A bad input refused by the loaded Generator leaves it as it was.
    with pytest.raises(InvalidImageError):
        generator.generate(PROMPT, image=image, mask_image=square_mask(320, 256), steps=4, seed=5)
    assert same(generator.generate(PROMPT, image=np.asarray(image), steps=4, seed=5).image, reference)


def test_inpainting_equals_diffusers_with_guidance_and_several_images(
    generator: Generator, references: dict[str, Any], image: Image.Image, mask: Image.Image
) -> None:
    arguments = {"strength": 0.8, "num_inference_steps": 3, "guidance_scale": 2.0, "negative_prompt": "blurry"}
    theirs, _ = diffusers_images(references, image, seeds=[7, 8], mask_image=mask, **arguments)
    ours = generator.generate(
        PROMPT,
        image=image,
        mask_image=mask,
        strength=0.8,
        steps=3,
        guidance_scale=2.0,
        negative_prompt="blurry",
        seed=7,
        num_images=2,
    )
    assert all(same(a, b) for a, b in zip(ours.images, theirs, strict=True))
    assert not same(ours.images[0], ours.images[1])
    assert ours.task == "inpaint" and set(ours.input_sizes) == {"image", "mask_image"}


def test_in_bfloat16_inpainting_equals_diffusers_pipeline_as_loaded(
    tiny_checkpoint: Path, image: Image.Image, mask: Image.Image
) -> None:
    """bf16, as on a GPU (inpainting: the encoder, the mask and image-to-image's noising; one task, because bf16
    convolutions are slow on a CPU). diffusers' from_pretrained keeps the text encoder's rotary inv_freq in
    float32; a reference whose modules were cast again (``from_pipe(pipe, dtype=...)`` does that) is another
    pipeline: the GPU suite compared with one and saw a mean difference of 0.74 for what is equal here."""
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline

    loaded = ZImageImg2ImgPipeline.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    assert loaded.text_encoder.rotary_emb.inv_freq.dtype == torch.float32
    pipe = ZImageInpaintPipeline(**loaded.components)  # on the same modules, as loaded
    pipe.set_progress_bar_config(disable=True)
    gen = Generator(model=tiny_checkpoint, strategy="cpu", settings=ZImageSettings(progress=False, dtype="bfloat16"))
    [theirs], _ = diffusers_images(
        {"inpaint": pipe}, image, seeds=[42], mask_image=mask, num_inference_steps=3, guidance_scale=0.0
    )
    ours = gen.generate(PROMPT, image=image, mask_image=mask, steps=3, seed=42)
    assert ours.dtype == "bfloat16" and same(ours.image, theirs)
    gen.close()


def test_every_placement_on_the_same_weights_gives_diffusers_image(
    tiny_checkpoint: Path, references: dict[str, Any], reference: Image.Image, image: Image.Image, mask: Image.Image
) -> None:
    [inpainted], _ = diffusers_images(
        references, image, seeds=[3], mask_image=mask, strength=1.0, num_inference_steps=2, guidance_scale=0.0
    )
    gen = Generator(model=tiny_checkpoint, strategy=CPUOnly(), settings=ZImageSettings(progress=False), load=True)
    pipe = gen.pipeline
    for strategy in every_strategy():
        gen.switch(strategy)
        result = gen.generate(PROMPT, image=image, steps=4, seed=5)
        assert result.strategy == strategy.name and same(result.image, reference), strategy.name
        if isinstance(strategy, StreamedOffload):  # block hooks around the VAE, which stays resident
            patched = gen.generate(PROMPT, image=image, mask_image=mask, steps=2, seed=3)
            assert same(patched.image, inpainted), strategy.name
    assert gen.pipeline is pipe  # one set of weights throughout: the task pipelines share its modules
    siblings = pipe.__dict__["_zimage_turbo_task_pipelines"]
    assert {name: s.transformer is pipe.transformer and s.vae is pipe.vae for name, s in siblings.items()} == {
        "image_to_image": True,
        "inpaint": True,
    }


@pytest.fixture
def inject() -> Iterator[Callable[..., None]]:
    handles: list[Any] = []

    def install(module: torch.nn.Module, when: Callable[..., bool]) -> None:
        def hook(_module: Any, args: Any) -> None:
            if when(args):
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        handles.append(module.register_forward_pre_hook(hook))

    yield install
    for handle in handles:
        handle.remove()


def test_out_of_memory_while_encoding_the_image_climbs_the_ladder(
    tiny_checkpoint: Path, reference: Image.Image, image: Image.Image, inject: Callable[..., None]
) -> None:
    gen = Generator(model=tiny_checkpoint, strategy=FullGPU(device="cpu"), settings=ZImageSettings(progress=False))
    gen.load()
    inject(gen.pipeline.vae.encoder, lambda _: isinstance(gen.strategy, FullGPU))
    result = gen.generate(PROMPT, image=image, steps=4, seed=5)
    [fallback] = result.fallbacks
    assert (fallback.kind, fallback.before, fallback.phase) == ("strategy", "full_gpu", "encode_image")
    assert result.strategy == "cpu" and same(result.image, reference)


def test_a_retry_keeps_the_encoded_images_and_the_callers_generator_state(
    tiny_checkpoint: Path, references: dict[str, Any], image: Image.Image, inject: Callable[..., None]
) -> None:
    gen = Generator(model=tiny_checkpoint, strategy=FullGPU(device="cpu"), settings=ZImageSettings(progress=False))
    gen.load()
    encodes: list[int] = []
    gen.pipeline.vae.encoder.register_forward_pre_hook(lambda *_: encodes.append(1))
    inject(gen.pipeline.transformer, lambda _: isinstance(gen.strategy, FullGPU))
    mine = torch.Generator().manual_seed(11)
    result = gen.generate(PROMPT, image=image, strength=0.5, steps=4, generator=mine)
    assert [(f.before, f.phase) for f in result.fallbacks] == [("full_gpu", "denoise")]
    assert encodes == [1]  # the retry on the next rung did not encode the image again
    theirs = torch.Generator().manual_seed(11)
    [made], _ = diffusers_images(
        references, image, generator=theirs, strength=0.5, num_inference_steps=4, guidance_scale=0.0
    )
    assert same(result.image, made)
    assert torch.equal(mine.get_state(), theirs.get_state())  # drawn from as diffusers draws, once
    assert result.seeds == (None,)


def test_a_downscaled_request_resizes_its_input_and_says_so(
    tiny_checkpoint: Path, references: dict[str, Any], inject: Callable[..., None]
) -> None:
    settings = ZImageSettings(progress=False, allow_downscale=True)
    gen = Generator(model=tiny_checkpoint, strategy=CPUOnly(), settings=settings)
    gen.load()
    # Pretend that encoding more than 550x550 pixels runs out of memory.
    inject(gen.pipeline.vae.encoder, lambda args: args[0].shape[-1] * args[0].shape[-2] > 550 * 550)
    source = picture(592, 592)
    result = gen.generate(PROMPT, image=source, strength=0.5, steps=2, seed=4)
    assert (result.width, result.height) == result.image.size == (512, 512)
    assert [(f.kind, f.phase) for f in result.fallbacks] == [("strategy", "encode_image"), ("downscale", "plan")]
    assert result.warnings == ("image was resized from 592x592 to 512x512 (Lanczos)",)
    # diffusers, given the image resized by its own image processor, at that size
    resized = references["image_to_image"].image_processor.resize(source, 512, 512)
    [made], _ = diffusers_images(
        references, resized, seeds=[4], strength=0.5, num_inference_steps=2, guidance_scale=0.0
    )
    assert same(result.image, made)


def test_batch_lines_and_the_command_line_take_input_images(
    tiny_checkpoint: Path, image: Image.Image, mask: Image.Image, tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    image.save(tmp_path / "in" / "harbour.png")
    mask.save(tmp_path / "in" / "square.png")
    prompts = tmp_path / "prompts.jsonl"
    line = {"prompt": PROMPT, "id": "patched", "image": "in/harbour.png", "mask": "in/square.png", "seed": 2}
    prompts.write_text(json.dumps({**line, "steps": 2}) + "\n")
    settings = ZImageSettings(model=str(tiny_checkpoint), progress=False)
    report = run_batch(prompts, tmp_path / "out", settings=settings, devices=["cpu"])
    assert report.generated == 1 and not report.failed
    [row] = Manifest(tmp_path / "out").rows()
    assert (row["image"], row["mask"], row["strength"]) == (
        str(tmp_path / "in" / "harbour.png"),
        str(tmp_path / "in" / "square.png"),
        1.0,
    )
    assert run_batch(prompts, tmp_path / "out", settings=settings, devices=["cpu"]).skipped == 1
    prompts.write_text(json.dumps({**line, "steps": 2, "strength": 0.5}) + "\n")
    with pytest.raises(BatchConflictError, match=r"strength 1\.0 -> 0\.5"):
        run_batch(prompts, tmp_path / "out", settings=settings, devices=["cpu"])

    # The command line, given the same line's arguments, makes the same image.
    out = tmp_path / "cli.png"
    arguments = ["generate", PROMPT, "--image", str(tmp_path / "in" / "harbour.png"), "--strength", "1"]
    arguments += ["--mask", str(tmp_path / "in" / "square.png"), "--steps", "2", "--seed", "2", "-o", str(out)]
    assert main([*arguments, "--model", str(tiny_checkpoint), "-q", "--strategy", "cpu"]) == 0
    stored = read_metadata(out)
    assert stored is not None
    assert (stored["task"], stored["strength"], stored["width"]) == ("inpaint", 1.0, 256)
    with Image.open(out) as cli, Image.open(tmp_path / "out" / "patched.png") as batch:
        assert same(cli.convert("RGB"), batch.convert("RGB"))
    assert main(["generate", PROMPT, "--image", str(tmp_path / "none.png"), "--model", str(tiny_checkpoint)]) == 2
