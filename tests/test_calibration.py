"""Measured GPU speeds: cached per GPU model, driver and PyTorch version; a damaged cache measured again; never
measured without a GPU; and the planner's time model and footnote follow them. The measurement itself is
injected here (it needs a CUDA GPU: tests/gpu/test_gpu_partial.py runs it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from zimage_turbo import DeviceSpeeds, GPUInfo, Hardware, ModelProfile, ZImageSettings, calibration, plan
from zimage_turbo.cli import main as cli_main
from zimage_turbo.hardware import GIB
from zimage_turbo.machine import Machine
from zimage_turbo.profile import Workload

SPEEDS = DeviceSpeeds(h2d_gib_per_s=24.5, bf16_tflops=150.0, fp8_tflops=290.0, name="RTX test card")
REAL_MEASURE = calibration.measure_speeds  # before the fixture below replaces it


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """What this process found so far is forgotten, as in a new process; a real measurement fails the test."""
    monkeypatch.setattr(calibration, "_found", {})
    monkeypatch.setattr(calibration, "_failed", set())

    def no_measuring(device: torch.device) -> DeviceSpeeds:
        raise AssertionError("the real measurement ran")

    monkeypatch.setattr(calibration, "measure_speeds", no_measuring)


def counting(speeds: DeviceSpeeds = SPEEDS) -> tuple[Callable[[], DeviceSpeeds], list[int]]:
    calls: list[int] = []

    def measure() -> DeviceSpeeds:
        calls.append(1)
        return speeds

    return measure, calls


def test_speeds_are_measured_once_and_kept_per_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cache" / calibration.SPEEDS_FILE
    measure, calls = counting()
    first = calibration.speeds_for("card A | driver 1 | torch 2", path, measure)
    assert calls == [1] and first.source == "measured" and first.bf16_tflops == 150.0
    assert calibration.speeds_for("card A | driver 1 | torch 2", path, measure) is first  # this process: kept
    monkeypatch.setattr(calibration, "_found", {})  # a new process reads the file
    again = calibration.speeds_for("card A | driver 1 | torch 2", path, measure)
    assert calls == [1] and again.source == "cached"
    assert again == DeviceSpeeds(24.5, 150.0, 290.0, "RTX test card", source="cached")
    # another driver (or GPU model, or PyTorch) is another entry; the first one stays
    other, other_calls = counting(DeviceSpeeds(50.0, 700.0))
    calibration.speeds_for("card A | driver 2 | torch 2", path, other)
    assert other_calls == [1] and set(calibration.read_speeds(path)) == {
        "card A | driver 1 | torch 2",
        "card A | driver 2 | torch 2",
    }
    assert [p.name for p in path.parent.iterdir()] == [calibration.SPEEDS_FILE]  # written whole: no leftovers


@pytest.mark.parametrize(
    "damage",
    [
        "{ not json",
        "[1, 2, 3]",
        json.dumps({"speeds": {"card": {"h2d_gib_per_s": -1, "bf16_tflops": 100}}}),
        json.dumps({"speeds": {"card": {"h2d_gib_per_s": "fast", "bf16_tflops": 100}}}),
        json.dumps({"speeds": {"card": {"h2d_gib_per_s": 20, "bf16_tflops": float("nan")}}}),
        "",
    ],
)
def test_a_damaged_cache_is_measured_again_and_rewritten(tmp_path: Path, damage: str) -> None:
    path = tmp_path / calibration.SPEEDS_FILE
    path.write_text(damage)
    measure, calls = counting()
    assert calibration.speeds_for("card", path, measure).source == "measured" and calls == [1]
    assert calibration.read_speeds(path)["card"].bf16_tflops == 150.0


def test_an_unwritable_cache_folder_only_means_measuring_again(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder would be")
    measure, calls = counting()
    assert calibration.speeds_for("card", blocker / calibration.SPEEDS_FILE, measure).bf16_tflops == 150.0
    assert calls == [1]


def test_nothing_is_measured_without_a_gpu(tmp_path: Path) -> None:
    def lookup(gpu: GPUInfo, path: Path) -> DeviceSpeeds:
        raise AssertionError("measured without a GPU")

    cpu = Hardware(host_total_bytes=8 * GIB, host_available_bytes=8 * GIB)
    assert calibration.with_speeds(cpu, path=tmp_path / "x.json", lookup=lookup) is cpu
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        REAL_MEASURE(torch.device("cpu"))
    # a Generator's machine on this CPU-only host: no GPU, no speeds, no file
    machine = Machine(ZImageSettings(cache_dir=tmp_path), None)
    if not torch.cuda.is_available():
        assert machine.detect().gpus == () and not (tmp_path / calibration.SPEEDS_FILE).exists()


def gpu_machine(*speeds: DeviceSpeeds | None) -> Hardware:
    gpus = tuple(GPUInfo(i, "RTX test card", 12 * GIB, 11 * GIB, (8, 9), speeds=s) for i, s in enumerate(speeds))
    return Hardware(gpus=gpus, host_total_bytes=64 * GIB, host_available_bytes=64 * GIB)


def test_each_gpu_gets_its_speeds_and_a_failed_measurement_falls_back_to_the_reference(tmp_path: Path) -> None:
    asked: list[int] = []

    def lookup(gpu: GPUInfo, path: Path) -> DeviceSpeeds:
        asked.append(gpu.index)
        if gpu.index == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return SPEEDS

    given = DeviceSpeeds(10.0, 10.0, source="given")
    hardware = calibration.with_speeds(gpu_machine(None, None, given), path=tmp_path / "x.json", lookup=lookup)
    assert [gpu.speeds for gpu in hardware.gpus] == [SPEEDS, None, given]  # speeds already there are kept
    assert asked == [0, 1]
    assert "speeds: 24.5 GiB/s pinned host-to-device, 150 TFLOP/s bf16, 290 fp8" in hardware.describe()
    assert hardware.to_dict()["gpus"][0]["speeds"]["bf16_tflops"] == 150.0


def test_the_calibrate_setting_skips_the_measurement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zimage_turbo.machine as machine_module

    monkeypatch.setattr(machine_module, "detect_hardware", lambda **_: gpu_machine(None))
    asked: list[Path] = []

    def with_speeds(hardware: Hardware, *, path: Path) -> Hardware:
        asked.append(path)
        return hardware

    monkeypatch.setattr(machine_module, "with_speeds", with_speeds)
    Machine(ZImageSettings(calibrate=False, cache_dir=tmp_path), None).detect()
    assert asked == []
    Machine(ZImageSettings(cache_dir=tmp_path), None).detect()
    assert asked == [tmp_path / calibration.SPEEDS_FILE]


def test_the_time_model_takes_the_measured_speeds() -> None:
    profile = ModelProfile.z_image_turbo()
    slow = profile.on(SPEEDS)
    assert slow.transfer_seconds(24.5 * GIB) == pytest.approx(1.0)
    work = Workload()
    ratio = profile.calibration.bf16_tflops / SPEEDS.bf16_tflops
    fast, scaled = profile.compute_seconds(work, 8), slow.compute_seconds(work, 8)
    assert scaled["encode"] == pytest.approx(fast["encode"] * ratio)
    assert scaled["decode"] == pytest.approx(fast["decode"] * ratio)
    fixed = 8 * profile.calibration.transformer_pass_s_fixed  # kernel launches: not scaled
    assert scaled["denoise"] == pytest.approx(fixed + (fast["denoise"] - fixed) * ratio)
    assert slow.on(SPEEDS) == slow and profile.on(None) is profile  # once is enough
    assert slow.calibration.speeds.describe().startswith("24.5 GiB/s") and slow.calibration.gpu == "RTX test card"


def test_the_plan_footnote_says_whose_speeds_it_used() -> None:
    profile = ModelProfile.z_image_turbo()
    measured = plan(profile, gpu_machine(SPEEDS))
    assert "cuda:0 (RTX test card: 24.5 GiB/s pinned host-to-device, 150 TFLOP/s bf16, 290 fp8" in measured.footnote
    reference = plan(profile, gpu_machine(None))
    assert "calibration GPU's speeds (NVIDIA H200: 51.6 GiB/s" in reference.footnote
    assert "cuda:0's were not measured" in reference.footnote
    cpu = plan(profile, Hardware(host_total_bytes=64 * GIB, host_available_bytes=64 * GIB))
    assert "H200" not in cpu.footnote and "CPU" in cpu.footnote
    assert measured.best is not None and reference.best is not None
    assert measured.best.seconds > 3 * reference.best.seconds  # a fifth of the matmul rate, half the bandwidth
    for text in (measured.describe(), measured._repr_markdown_(), measured._repr_html_()):
        assert "RTX test card" in text


def test_plan_on_the_command_line_takes_typed_speeds(capsys: pytest.CaptureFixture[str]) -> None:
    typed = ["--h2d-gib-s", "23", "--bf16-tflops", "120"]
    assert cli_main(["plan", "--vram-gib", "12", "--ram-gib", "64", *typed]) == 0
    out = capsys.readouterr().out
    assert "->partial(" in out and "23.0 GiB/s pinned host-to-device, 120 TFLOP/s bf16 (given)" in out
    assert cli_main(["plan", "--vram-gib", "12"]) == 0
    assert "calibration GPU's speeds (NVIDIA H200" in capsys.readouterr().out
    assert cli_main(["plan", "--vram-gib", "12", "--bf16-tflops", "-3"]) != 0
