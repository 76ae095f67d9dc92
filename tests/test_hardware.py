from __future__ import annotations

import pytest

from zimage_turbo import GPUInfo, Hardware, detect_hardware
from zimage_turbo.hardware import GIB, host_peak_rss_bytes, usable_gpu_bytes


def test_detects_this_machine() -> None:
    hardware = detect_hardware()
    assert hardware.host_total_bytes > 0
    assert 0 < hardware.host_available_bytes <= hardware.host_total_bytes
    assert "host RAM" in hardware.describe()
    if not hardware.gpus and not hardware.mps:
        assert hardware.accelerator == "cpu"


def test_hand_built_hardware() -> None:
    t4 = GPUInfo(0, "Tesla T4", total_bytes=15 * GIB, free_bytes=14 * GIB, compute_capability=(7, 5))
    h100 = GPUInfo(1, "H100", total_bytes=80 * GIB, free_bytes=79 * GIB, compute_capability=(9, 0), memory_fraction=0.2)
    hardware = Hardware(gpus=(t4, h100), host_total_bytes=64 * GIB, host_available_bytes=60 * GIB)
    assert hardware.accelerator == "cuda"
    assert not t4.bf16 and h100.bf16  # a T4 only emulates bf16
    assert h100.device == "cuda:1"
    assert h100.limit_bytes == 16 * GIB
    assert "capped to 20%" in hardware.describe()
    assert Hardware(mps=True).accelerator == "mps"


def test_usable_memory_sees_the_process_cap_that_mem_get_info_misses() -> None:
    # An H200 capped to 16 GiB: the driver reports 139 GiB free, the process can use 16.
    usable = usable_gpu_bytes(driver_free=139 * GIB, total=140 * GIB, fraction=16 / 140, reserved=0, allocated=0)
    assert usable == pytest.approx(16 * GIB, abs=1)


def test_usable_memory_counts_reusable_cache_and_allocations() -> None:
    usable = usable_gpu_bytes(driver_free=10 * GIB, total=24 * GIB, fraction=1.0, reserved=8 * GIB, allocated=5 * GIB)
    assert usable == 13 * GIB  # 10 free on the card + 3 cached by our allocator
    capped = usable_gpu_bytes(driver_free=10 * GIB, total=24 * GIB, fraction=0.5, reserved=8 * GIB, allocated=5 * GIB)
    assert capped == 7 * GIB  # the cap (12) minus what is allocated (5)


def test_user_budget_limits_usable_memory() -> None:
    usable = usable_gpu_bytes(
        driver_free=20 * GIB, total=24 * GIB, fraction=1.0, reserved=0, allocated=0, budget=6 * GIB
    )
    assert usable == 6 * GIB
    assert usable_gpu_bytes(driver_free=1, total=2, fraction=1.0, reserved=0, allocated=5, budget=3) == 0


def test_host_peak_rss_is_plausible() -> None:
    import psutil

    assert host_peak_rss_bytes() >= psutil.Process().memory_info().rss * 0.5
