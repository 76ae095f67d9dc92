"""The command line's output: -q/-v anywhere, --json (one object on stdout, nothing else), summaries printed
once, and a taken make-checkpoint folder refused as a bad argument."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import zimage_turbo.cli as cli
from zimage_turbo.cli import main


@pytest.mark.parametrize(
    ("argv", "quiet", "verbose"),
    [
        (["-q", "hardware"], True, False),
        (["hardware", "-q"], True, False),
        (["--quiet", "hardware"], True, False),
        (["-v", "hardware"], False, True),
        (["hardware", "--verbose"], False, True),
        (["-q", "hardware", "-v"], True, True),
        (["hardware"], False, False),
    ],
)
def test_quiet_and_verbose_work_before_and_after_the_command(
    argv: list[str], quiet: bool, verbose: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, bool] = {}
    monkeypatch.setattr(cli, "configure_logging", lambda **given: seen.update(given))
    assert main(argv) == 0
    assert seen == {"quiet": quiet, "verbose": verbose}
    capsys.readouterr()


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_silences_our_logging_and_the_libraries_progress_bars(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["make-checkpoint", "tiny", str(tmp_path / "loud")]
    assert main(command) == 0
    loud = capsys.readouterr().err
    # what -q must remove: our INFO line and transformers' bar while it saves the weights
    assert "building the tiny checkpoint" in loud and "Writing model shards" in loud
    command = ["make-checkpoint", "tiny", str(tmp_path / "quiet")]
    assert main(["-q", *command] if where == "before" else [*command, "-q"]) == 0
    quiet = capsys.readouterr()
    assert "building the tiny checkpoint" not in quiet.err and "Writing model shards" not in quiet.err
    assert "Wrote the tiny checkpoint" in quiet.out
    # and the bars are on again afterwards (main may run inside a longer-lived process)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()


def test_a_taken_checkpoint_folder_is_a_bad_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["make-checkpoint", "tiny", str(taken), "-q"]) == 2
    assert "not empty" in capsys.readouterr().err
    # --overwrite replaces only a checkpoint made by make-checkpoint, never another folder
    assert main(["make-checkpoint", "tiny", str(taken), "--overwrite", "-q"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["make-checkpoint", "tiny", str(a_file), "-q"]) == 2
    assert "not a folder" in capsys.readouterr().err


def only_json(out: str) -> dict[str, Any]:
    """stdout must be one JSON object and nothing else (json.loads refuses anything around it)."""
    answer = json.loads(out)
    assert isinstance(answer, dict)
    return answer


def test_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--gpus", "24,12", "--ram-gib", "64", "--size", "1536x1024"]
    assert main([*argv, "--json"]) == 0
    answer = only_json(capsys.readouterr().out)
    assert answer["workload"] == {"width": 1536, "height": 1024, "images": 1, "guidance": False, "steps": 8}
    assert [g["free_bytes"] for g in answer["hardware"]["gpus"]] == [24 * 2**30, 12 * 2**30]
    assert answer["hardware"]["host_available_bytes"] == 64 * 2**30
    candidates = answer["candidates"]
    assert {"full_gpu", "multi_gpu", "streamed+vae_tiling"} <= {c["name"] for c in candidates}
    for c in candidates:
        assert set(c) == {
            "name", "strategy", "vae_tiling", "fits", "reason", "seconds", "gpu_peak_bytes", "host_bytes"
        }  # fmt: skip
        assert (c["reason"] == "") == c["fits"]
        assert all(device.startswith("cuda:") and size > 0 for device, size in c["gpu_peak_bytes"].items())
    assert answer["best"] == next(c["name"] for c in candidates if c["fits"])
    # the same ranking as the table
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert f"->{answer['best']} " in table


def test_hardware_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hardware", "--json"]) == 0
    answer = only_json(capsys.readouterr().out)
    assert answer["host_total_bytes"] >= answer["host_available_bytes"] > 0
    assert answer["accelerator"] in {"cuda", "mps", "cpu"} and isinstance(answer["gpus"], list)


def test_generate_json(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cat.png"
    argv = ["generate", "a cat", "-o", str(out), "--size", "256x256", "--steps", "1", "--seed", "5"]
    # no -q: the progress bars and INFO lines are there, and all of them on stderr
    assert main([*argv, "--num-images", "2", "--model", str(tiny_checkpoint), "--json"]) == 0
    answer = only_json(capsys.readouterr().out)
    assert answer["paths"] == [str((tmp_path / "cat-0.png").resolve()), str((tmp_path / "cat-1.png").resolve())]
    assert all(Path(p).is_file() for p in answer["paths"])
    assert answer["seeds"] == [5, 6] and (answer["width"], answer["height"], answer["steps"]) == (256, 256, 1)
    assert answer["strategy"] == "cpu" and answer["device"] == "cpu"
    assert set(answer["timings"]) == {
        "load",
        "prepare",
        "encode",
        "encode_image",
        "denoise",
        "decode",
        "recovery",
        "total",
    }
    assert answer["timings"]["total"] > 0
    assert answer["timings"]["encode_image"] == 0 and answer["task"] == "text_to_image"  # no input image
    assert answer["fallbacks"] == [] and answer["warnings"] == []


def test_batch_prints_its_summary_once_and_as_json(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat", "id": "cat"}\n{"prompt": "a dog", "id": "dog"}\n')
    argv = ["batch", str(prompts), "--size", "256x256", "--steps", "1", "--model", str(tiny_checkpoint)]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("2 generated, 0 already done") == 1
    assert main([*argv, "--out", str(tmp_path / "two"), "--json"]) == 0
    answer = only_json(capsys.readouterr().out)
    assert answer == {
        "total": 2,
        "skipped": 0,
        "generated": 2,
        "failed": [],
        "complete": True,
        "manifest": str(tmp_path / "two" / "manifest.jsonl"),
        "seconds": answer["seconds"],
        "devices": ["default"],  # the pool's name for "wherever the Generator plans" (no GPU here)
    }


def test_json_errors_print_nothing_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--vram-gib", "-1", "--json"]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and "--vram-gib" in printed.err


def test_options_before_bench_are_refused_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    # "bench ..." goes to the harness's own parser; with -q first it reached ours, which had no handler for it
    assert main(["-q", "bench"]) == 2
    assert "after the word bench" in capsys.readouterr().err
