"""Input images of image-to-image and inpainting, checked before anything loads: each bad one is refused with a
typed error naming its argument; accepted ones are converted as diffusers' image processors convert."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from zimage_turbo import Generator, InvalidImageError, InvalidRequestError, TaskInputs
from zimage_turbo.batch_items import items_from, read_prompts
from zimage_turbo.request import GenerationRequest, requests_for
from zimage_turbo.task_inputs import denoising_steps, read_image, task_inputs


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def refused(argument: str, **given: Any) -> InvalidImageError:
    with pytest.raises(InvalidImageError) as caught:
        task_inputs(**given)
    assert caught.value.argument == argument
    assert isinstance(caught.value, InvalidRequestError)  # callers catching the older class still catch it
    return caught.value


def test_task_and_default_strength_follow_the_diffusers_pipelines() -> None:
    image, mask = noise(320, 256), noise(320, 256, "L")
    to_image = task_inputs(image)
    inpaint = task_inputs(image, mask)
    assert to_image is not None and inpaint is not None
    assert (to_image.task, to_image.strength) == ("image_to_image", 0.6)  # ZImageImg2ImgPipeline's default
    assert (inpaint.task, inpaint.strength) == ("inpaint", 1.0)  # ZImageInpaintPipeline's default
    assert inpaint.sizes() == {"image": (320, 256), "mask_image": (320, 256)}
    assert task_inputs() is None


@pytest.mark.parametrize("strength", [0, -0.1, 1.01, float("nan"), float("inf"), True, "0.5", None])
def test_strength_outside_0_1_is_refused(strength: object) -> None:
    if strength is None:  # None is the default, but not without an image
        with pytest.raises(InvalidRequestError, match="strength applies to image-to-image"):
            task_inputs(None, None, 0.5)
        return
    with pytest.raises(InvalidRequestError, match="strength"):
        task_inputs(noise(256, 256), None, strength)


def test_a_mask_without_an_image_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="mask_image applies"):
        task_inputs(None, noise(256, 256, "L"))


def test_mask_of_another_size_is_refused() -> None:
    error = refused("mask_image", image=noise(320, 256), mask_image=noise(256, 256, "L"))
    assert "256x256" in str(error) and "320x256" in str(error)


def test_files_missing_undecodable_or_truncated_are_refused(tmp_path: Path) -> None:
    assert "no file" in str(refused("image", image=tmp_path / "missing.png"))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert "not an image" in str(refused("image", image=text))
    whole = tmp_path / "whole.png"
    noise(320, 256).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:2000])
    assert "could not be decoded" in str(refused("mask_image", image=whole, mask_image=cut))
    # Checked by its header alone (a batch line long before its turn), the truncated file passes; decoding refuses it.
    lazy = task_inputs(whole, cut, decode=False)
    assert lazy is not None and lazy.mask is not None and lazy.mask.pixels is None
    with pytest.raises(InvalidImageError, match="could not be decoded"):
        lazy.loaded()


def test_images_beyond_the_decompression_bomb_limit_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.png"
    noise(320, 256).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 320 * 256 - 1)
    for given in (path, noise(320, 256), np.zeros((256, 320, 3), np.uint8)):
        assert "decompression-bomb" in str(refused("image", image=given))
    # Beyond twice the limit Pillow itself raises while opening: refused the same way.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert "decompression-bomb" in str(refused("image", image=path))


def test_modes_are_converted_as_diffusers_converts_them_or_refused() -> None:
    base = noise(256, 256)
    for mode in ("RGBA", "L", "P", "CMYK", "LA"):
        converted = read_image(base.convert(mode), "image").pixels
        assert converted is not None and converted.mode == "RGB"
        assert np.array_equal(np.asarray(converted), np.asarray(base.convert(mode).convert("RGB")))
    mask = read_image(base, "mask_image").pixels
    assert mask is not None and mask.mode == "L"  # diffusers' mask processor turns masks grey the same way
    assert np.array_equal(np.asarray(mask), np.asarray(base.convert("L")))
    for mode in ("I;16", "I", "F"):
        deep = Image.new(mode, (256, 256))
        with pytest.raises(InvalidImageError, match="16-bit or floating point"):
            read_image(deep, "image")


def test_numpy_arrays_uint8_float_and_bool_masks() -> None:
    pixels = np.asarray(noise(256, 256))
    same = read_image(pixels, "image").pixels
    assert same is not None and np.array_equal(np.asarray(same), pixels)
    # floats in [0, 1], what diffusers takes, through diffusers' own numpy_to_pil
    scaled = read_image(pixels / 255.0, "image").pixels
    assert scaled is not None and np.array_equal(np.asarray(scaled), pixels)
    flags = np.zeros((256, 256), bool)
    flags[:128] = True
    mask = read_image(flags, "mask_image").pixels
    assert mask is not None and np.asarray(mask)[0, 0] == 255 and np.asarray(mask)[-1, -1] == 0
    for bad in (pixels.astype(np.int32), pixels[:, :, :2], pixels / 100.0, np.full((256, 256), np.nan)):
        with pytest.raises(InvalidImageError):
            read_image(bad, "image")
    with pytest.raises(InvalidImageError, match="PIL image, a numpy array or a path"):
        read_image([1, 2, 3], "image")


def test_a_files_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown turned a quarter
    noise(320, 256).save(path, exif=exif)
    header = read_image(path, "image", decode=False)
    decoded = read_image(path, "image")
    assert header.size == decoded.size == (256, 320)
    assert decoded.pixels is not None and decoded.pixels.size == (256, 320)


def test_the_output_takes_the_inputs_size_by_default() -> None:
    inputs = task_inputs(noise(333, 270))
    assert inputs is not None
    [request] = requests_for(["a fox"], inputs=inputs, seed=1)
    assert (request.width, request.height) == (320, 256)  # rounded down to multiples of 16, as diffusers does
    assert inputs.resized(256, 320) == ["image was resized from 333x270 to 320x256 (Lanczos)"]
    inpaint = task_inputs(noise(333, 270), noise(333, 270, "L"))
    assert (
        inpaint is not None
        and inpaint.resized(256, 320)[1] == "mask_image was resized from 333x270 to 320x256 (Lanczos)"
    )
    assert inputs.output_size(512, None) == (512, 624)  # one side given: the aspect ratio is kept
    assert inputs.output_size(None, 640) == (512, 640)
    [text] = requests_for(["a fox"], seed=1)
    assert (text.width, text.height) == (1024, 1024)
    photo = task_inputs(Image.new("RGB", (4000, 3000)))
    assert photo is not None
    with pytest.raises(InvalidImageError, match="width=1024, height=768 keeps its aspect ratio") as caught:
        photo.output_size(None, None)
    assert caught.value.argument == "image"
    assert photo.output_size(768, 1024) == (768, 1024)


def test_strength_that_leaves_no_step_is_refused_and_steps_follow_diffusers() -> None:
    # ZImageImg2ImgPipeline.get_timesteps: int(steps * strength) passes, at least one for any strength > 0
    assert [denoising_steps(8, s) for s in (1.0, 0.6, 0.5, 0.1, 1e-9)] == [8, 5, 4, 1, 1]
    inputs = task_inputs(noise(256, 256), None, 1e-300)
    assert inputs is not None
    with pytest.raises(InvalidRequestError, match="leaves no denoising step"):
        GenerationRequest("a fox", height=256, width=256, inputs=inputs)


def test_bad_inputs_fail_before_the_model_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    gen = Generator(model=tiny_checkpoint)
    bad: list[dict[str, Any]] = [
        {"image": tmp_path / "missing.png"},
        {"image": noise(256, 256), "strength": 2.0},
        {"image": noise(256, 256), "mask_image": noise(320, 256)},
        {"mask_image": noise(256, 256)},
        {"image": Image.new("I;16", (256, 256))},
    ]
    for given in bad:
        with pytest.raises(InvalidRequestError):
            gen.generate("a fox", **given)
    assert not gen.is_loaded


def test_batch_lines_name_inputs_relative_to_the_prompt_file(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    noise(336, 256).save(tmp_path / "in" / "a.png")
    noise(336, 256, "L").save(tmp_path / "in" / "m.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a fox", "id": "plain"}\n'
        '{"prompt": "a fox", "id": "redrawn", "image": "in/a.png", "strength": 0.5}\n'
        '{"prompt": "a fox", "id": "patched", "image": "in/a.png", "mask": "in/m.png", "width": 256, "height": 256}\n'
    )
    plain, redrawn, patched = read_prompts(prompts)
    assert (plain.image, plain.width) == (None, 1024)
    assert redrawn.image == str(tmp_path / "in" / "a.png") and redrawn.strength == 0.5
    assert (redrawn.width, redrawn.height) == (336, 256)  # the image's size by default
    assert patched.mask == str(tmp_path / "in" / "m.png") and patched.strength == 1.0
    request = patched.request()
    assert isinstance(request.inputs, TaskInputs) and request.task == "inpaint"
    assert request.inputs.image.pixels is None  # decoded when its turn comes, not when the file is read
    prompts.write_text('{"prompt": "a fox", "image": "in/none.png"}\n')
    with pytest.raises(InvalidImageError, match=r"prompts.jsonl:1: image: there is no file"):
        read_prompts(prompts)
    with pytest.raises(InvalidRequestError, match="image must be a path"):
        items_from([{"prompt": "a fox", "image": 3}])
