"""How an image was made, stored in its PNG (result.save, batches, the CLI) and read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import zimage_turbo
from zimage_turbo import GenerationResult, Generator, Timings, ZImageSettings, read_metadata
from zimage_turbo.batch_folder import write_image
from zimage_turbo.batch_items import items_from
from zimage_turbo.cli import main


def made(count: int = 1, **changes: object) -> GenerationResult:
    fields: dict[str, object] = {
        "images": tuple(Image.new("RGB", (32, 16), (40 * k, 0, 0)) for k in range(count)),
        "prompt": "a red fox, in the snow: at dawn",
        "seeds": tuple(7 + k for k in range(count)),
        "width": 32,
        "height": 16,
        "steps": 8,
        "guidance_scale": 0.0,
        "strategy": "full_gpu",
        "device": "cuda:0",
        "dtype": "bfloat16",
        "timings": Timings(),
        "quantization": "fp8",
        "negative_prompt": "blurry",
        "model": "Tongyi-MAI/Z-Image-Turbo",
        "model_revision": "f" * 40,
        "loras": {"ink wash": 0.8, "grain": -0.25},
    }
    fields.update(changes)
    return GenerationResult(**fields)  # type: ignore[arg-type]


def expected(result: GenerationResult, index: int) -> dict[str, object]:
    return {
        "prompt": result.prompt,
        "negative_prompt": result.negative_prompt,
        "seed": result.seeds[index],
        "steps": result.steps,
        "width": result.width,
        "height": result.height,
        "guidance_scale": result.guidance_scale,
        "strategy": result.strategy,
        "quantization": result.quantization,
        "dtype": result.dtype,
        "model": result.model,
        "model_revision": result.model_revision,
        "loras": dict(result.loras),
        "version": zimage_turbo.__version__,
    }


def test_one_image_round_trip(tmp_path: Path) -> None:
    result = made()
    [path] = result.save(tmp_path / "fox.png")
    assert read_metadata(path) == expected(result, 0)
    with Image.open(path) as image:
        assert image.size == (32, 16)
        assert "prompt" not in image.info  # ComfyUI's key: left alone


def test_several_images_each_carry_their_seed(tmp_path: Path) -> None:
    result = made(3, prompt="ein Fuchs im Schnee, 雪の中の狐")  # not Latin-1: stored as UTF-8
    paths = result.save(tmp_path / "fox.png")
    assert [read_metadata(path) for path in paths] == [expected(result, k) for k in range(3)]
    assert [read_metadata(path)["seed"] for path in paths] == [7, 8, 9]  # type: ignore[index]


def test_parameters_chunk_in_the_web_ui_format(tmp_path: Path) -> None:
    [path] = made(guidance_scale=3.5).save(tmp_path / "fox.png")
    with Image.open(path) as image:
        text = image.info["parameters"]
    assert text == (
        "a red fox, in the snow: at dawn\n"
        "Negative prompt: blurry\n"
        "Steps: 8, Sampler: Euler, CFG scale: 3.5, Seed: 7, Size: 32x16, Model: Tongyi-MAI/Z-Image-Turbo, "
        f"Model revision: {'f' * 40}, Strategy: full_gpu, Quantization: fp8, "
        'LoRAs: "ink wash: 0.8, grain: -0.25", Version: zimage-turbo '
        f"{zimage_turbo.__version__}"
    )
    [plain] = made(negative_prompt=None, quantization=None, model=None, model_revision=None, loras={}).save(
        tmp_path / "plain.png"
    )
    with Image.open(plain) as image:
        assert image.info["parameters"] == (
            "a red fox, in the snow: at dawn\n"
            f"Steps: 8, Sampler: Euler, CFG scale: 0, Seed: 7, Size: 32x16, Strategy: full_gpu, "
            f"Version: zimage-turbo {zimage_turbo.__version__}"
        )


def test_other_formats_and_plain_files_have_none(tmp_path: Path) -> None:
    [jpeg] = made().save(tmp_path / "fox.jpg")
    assert read_metadata(jpeg) is None
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert read_metadata(tmp_path / "plain.png") is None
    (tmp_path / "notes.png").write_text("not an image")
    assert read_metadata(tmp_path / "notes.png") is None
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "missing.png")


def test_batch_images_carry_it(tmp_path: Path) -> None:
    item = items_from([{"prompt": "a red fox", "id": "fox", "width": 256, "height": 256, "seed": 7}], steps=8)[0]
    result = made(prompt=item.prompt)
    path = write_image(tmp_path, item, result)
    assert read_metadata(path) == expected(result, 0)


def test_a_generation_records_its_model_and_negative_prompt(tiny_checkpoint: Path, tmp_path: Path) -> None:
    generator = Generator(model=tiny_checkpoint, settings=ZImageSettings(progress=False, source="local"))
    result = generator.generate("a fox", height=256, width=256, steps=1, seed=3, num_images=2, negative_prompt="dull")
    paths = result.save(tmp_path / "fox.png")
    stored = [read_metadata(path) for path in paths]
    assert [entry["seed"] for entry in stored] == [3, 4]  # type: ignore[index]
    assert stored[0] == {**expected(result, 0), "model": "tiny", "negative_prompt": "dull", "strategy": "cpu"}


def test_cli_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = made()
    [path] = result.save(tmp_path / "fox.png")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("a red fox, in the snow: at dawn\nNegative prompt: blurry\nSteps: 8, Sampler: Euler")
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected(result, 0)


def test_cli_info_without_our_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert main(["info", str(tmp_path / "plain.png")]) == 2
    assert "holds no zimage-turbo metadata" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.png")]) == 2
    assert "is not a file" in capsys.readouterr().err
