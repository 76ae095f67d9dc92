"""The bench harness's ``probe`` case: the environment, the planner's predictions at each budget, and the card's
limits (bf16 matmul rate, host-to-device bandwidth) measured in the same run, so that a report can say how close
each case came to what the hardware allows."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["probe"]

GIB = 2**30


def probe(checkpoint: str, device: str, height: int, width: int, budgets: Sequence[float | None]) -> dict[str, Any]:
    """The row of the ``probe`` case: versions and hardware, what the planner predicts at each budget for this
    checkpoint and size, and the card's limits measured now (``floors``)."""
    import platform

    import diffusers
    import torch
    import transformers

    from zimage_turbo import Hardware, check_pipeline_dir, detect_hardware
    from zimage_turbo.planner import plan
    from zimage_turbo.profile import ModelProfile, Workload

    cuda = device == "cuda" and torch.cuda.is_available()
    hardware = detect_hardware()
    profile = ModelProfile.from_layout(check_pipeline_dir(checkpoint), dtype_bytes=2)
    work = Workload(height=height, width=width)
    plans: dict[str, list[dict[str, Any]]] = {}
    for budget in budgets:
        gpus = tuple(_with_free(gpu, None if budget is None else int(budget * GIB)) for gpu in hardware.gpus)
        planned = plan(profile, Hardware(gpus, hardware.host_total_bytes, hardware.host_available_bytes), work)
        plans["unlimited" if budget is None else f"{budget:g}"] = [
            {
                "strategy": c.strategy.name,
                "vae_tiling": c.vae_tiling,
                "fits": c.fits,
                "predicted_gib": c.peak_bytes / GIB,
                "predicted_s": c.seconds,
                "reason": c.reason,
            }
            for c in planned.candidates
        ]
    environment = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "gpu_memory_gib": [
            torch.cuda.get_device_properties(i).total_memory / GIB for i in range(torch.cuda.device_count())
        ]
        if cuda
        else [],
        "host_ram_gib": hardware.host_total_bytes / GIB,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    transformer = profile.transformer
    return {
        "status": "ok",
        "environment": environment,
        "plans": plans,
        "weights_gib": profile.weight_bytes / GIB,
        "transformer_block_gib": sum(transformer.block_bytes) / GIB,
        "transformer_gib": transformer.weight_bytes / GIB,
        "pass_tflop": profile.transformer_pass_tflop(work),
        "floors": _limits() if cuda else {},
    }


def _with_free(gpu: Any, budget: int | None) -> Any:
    from dataclasses import replace

    return gpu if budget is None else replace(gpu, free_bytes=min(gpu.free_bytes, budget))


def _limits() -> dict[str, float]:
    """The card's bf16 matmul rate and host-to-device bandwidth, measured now (medians)."""
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(10):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        a @ b
        end.record()
        end.synchronize()
        rates.append(2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e12)
    del a, b
    nbytes = GIB
    device_buffer = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def bandwidth(host: torch.Tensor) -> float:
        device_buffer.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            device_buffer.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            samples.append(nbytes / (time.perf_counter() - started) / GIB)
        return statistics.median(samples)

    pinned = bandwidth(torch.ones(nbytes, dtype=torch.uint8, pin_memory=True))
    pageable = bandwidth(torch.ones(nbytes, dtype=torch.uint8))
    return {"bf16_matmul_tflops": statistics.median(rates), "pinned_h2d_gib_s": pinned, "pageable_h2d_gib_s": pageable}
