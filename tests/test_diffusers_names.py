"""diffusers' spellings of our arguments (torch_dtype, num_inference_steps, generator=...) and step previews."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zimage_turbo import Generator, InvalidSettingsError, ZImageSettings


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
