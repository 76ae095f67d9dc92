from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zimage_turbo import Generator, ZImageSettings, __version__
from zimage_turbo.cli import main


def test_generate_writes_the_image_the_library_makes(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fox.png"
    status = main(
        [
            "generate",
            "a red fox",
            "-o",
            str(out),
            "--size",
            "320x256",
            "--seed",
            "3",
            "--steps",
            "2",
            "--model",
            str(tiny_checkpoint),
            "--quiet",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed and "seed 3" in printed and "320x256" in printed
    expected = Generator(model=tiny_checkpoint, settings=ZImageSettings(progress=False)).generate(
        "a red fox", width=320, height=256, seed=3, steps=2
    )
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected.image))


def test_several_images(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "many.png"
    assert (
        main(
            [
                "generate",
                "a cat",
                "-o",
                str(out),
                "--size",
                "256x256",
                "--num-images",
                "2",
                "--steps",
                "1",
                "--model",
                str(tiny_checkpoint),
                "-q",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.glob("many-*.png")) == ["many-0.png", "many-1.png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "1000x1000"], "multiple of 16"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--steps", "0"], "steps"),
        (["--num-images", "0"], "num_images"),
        (["-o", "no-such-folder/x.png"], "does not exist"),
        (["-o", "picture"], "extension"),
    ],
)
def test_bad_arguments_fail_before_loading(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The model named here does not exist: reaching the loader would be a different error.
    status = main(["generate", "a cat", "--model", "/nonexistent/model", *args])
    assert status == 2
    assert message in capsys.readouterr().err


def test_existing_output_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "taken.png"
    out.write_bytes(b"keep me")
    assert main(["generate", "a cat", "-o", str(out), "--model", "/nonexistent/model"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_output_under_the_home_folder(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "a cat", "-o", "~/cat.png", "--size", "256x256", "--steps", "1", "--quiet"]
    assert main([*argv, "--model", str(tiny_checkpoint)]) == 0
    assert Image.open(tmp_path / "cat.png").size == (256, 256)
    assert not (tmp_path / "~").exists()
    capsys.readouterr()


def test_empty_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "  ", "--model", "/nonexistent/model"]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_unknown_strategy_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["generate", "a cat", "--strategy", "warp"])
    assert caught.value.code == 2
    assert "full_gpu" in capsys.readouterr().err


def test_speed_options_reach_the_settings(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fox.png"
    argv = ["generate", "a fox", "-o", str(out), "--model", str(tiny_checkpoint), "--size", "256x256", "-q"]
    assert main([*argv, "--attention", "native", "--compile", "off", "--quantization", "none"]) == 0
    assert out.is_file()
    # a kernel that cannot run on this machine is refused before loading, as a settings error
    assert main([*argv, "--overwrite", "--attention", "cudnn"]) == 2
    assert "attention='cudnn' cannot run on cpu" in capsys.readouterr().err


def test_unknown_speed_option_values_are_usage_errors() -> None:
    for option, value in (("--attention", "fastest"), ("--compile", "maybe"), ("--quantization", "int4")):
        with pytest.raises(SystemExit) as caught:
            main(["generate", "a cat", option, value])
        assert caught.value.code == 2


def test_model_not_found_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["generate", "a cat", "-o", str(tmp_path / "x.png"), "--offline", "--cache-dir", str(tmp_path / "c")])
    assert status == 1
    error = capsys.readouterr().err
    assert "ModelNotFoundError" in error and str(tmp_path / "c" / "hub") in error


def test_demo_writes_a_png_and_reports_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.png"
    assert main(["demo", "-o", str(out), "-q"]) == 0
    assert Image.open(out).size == (512, 512)
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed and "Demo finished in" in printed


def test_make_checkpoint_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-checkpoint", "tiny", str(tmp_path / "ck"), "-q"]) == 0
    assert (tmp_path / "ck" / "model_index.json").is_file()
    # a folder that is taken is a bad argument, like the others (exit status 2), refused before building
    assert main(["make-checkpoint", "tiny", str(tmp_path / "ck"), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_hardware_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hardware"]) == 0
    assert "host RAM" in capsys.readouterr().out


def test_module_entry_point_and_version() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "zimage_turbo", "--version"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0
    assert run.stdout.strip() == f"zimage-turbo {__version__}"


def test_main_leaves_the_library_logger_alone() -> None:
    import logging

    library = logging.getLogger("zimage_turbo")
    before = (list(library.handlers), library.level, library.propagate)
    main(["hardware", "-q"])
    assert (list(library.handlers), library.level, library.propagate) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-images", "100000"], "num_images"),  # refused at once, not after checking 100000 paths
        (["--guidance", "nan"], "guidance_scale"),
        (["--seed", "-1"], "seed"),
        (["--size", "²x2"], "WIDTHxHEIGHT"),
        (["-o", "a\x00b.png"], "NUL"),
        (["-o", "x" * 300 + ".png"], "file systems allow 255"),
    ],
)
def test_more_bad_arguments_fail_before_loading(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "a cat", "--model", "/nonexistent/model", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_bad_setting_in_the_environment_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZIMAGE_VRAM_RESERVE_GIB", "nan")
    assert main(["generate", "a cat", "--model", "/nonexistent/model"]) == 2
    assert "ZIMAGE_VRAM_RESERVE_GIB" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vram-gib", "-4"], "--vram-gib"),
        (["--vram-gib", "nan"], "--vram-gib"),
        (["--ram-gib", "0"], "--ram-gib"),
        (["--reserve-gib", "-1"], "--reserve-gib"),
        (["--gpus", "100000x12"], "1 to 64 GPUs"),
        (["--gpus", "2xinf"], "above 0"),
        (["--gpus", "2x1e300"], "at most"),
        (["--vram-gib", "1e308"], "--vram-gib"),
        (["--reserve-gib", "1e308"], "--reserve-gib"),
        (["--ram-gib", "1e300"], "--ram-gib"),
        (["--vram-gib", "8", "--gpus", "2x12"], "give one of them"),
    ],
)
def test_plan_refuses_impossible_hardware(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *args]) == 2
    assert message in capsys.readouterr().err
