"""What a placement counts as its own on each GPU (``Placement.held_bytes``), which the planner adds back to the
free memory: our weights, and what the allocator handed out beyond them since the pipeline was loaded (up to a bound).

Without the second, the plan at the first call saw the kernels' workspaces (14-200 MiB on the H200) as someone
else's memory, and a `partial` placement sized at load no longer fitted and was re-sized into a very different
split (benchmarks/results/gpu-tests-partial-resized-at-first-call-h200-2026-11-29.log). No CUDA here: the
weights are stand-ins that say they are on ``cuda:0`` and the allocator's count is patched.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import zimage_turbo.placement as placement_module
from zimage_turbo import StreamedOffload
from zimage_turbo.placement import UNTRACKED_MAX, Placement

MIB = 2**20


def _placement(monkeypatch: pytest.MonkeyPatch, weights: int, allocated: int, before: int) -> Placement:
    tensor = SimpleNamespace(device=torch.device("cuda", 0), nbytes=weights)
    module = SimpleNamespace(parameters=lambda: [tensor], buffers=list)
    monkeypatch.setattr(placement_module, "components", lambda pipe: {"transformer": module})
    monkeypatch.setattr(placement_module, "stored_bytes", lambda t: t.nbytes)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index=None: allocated)
    placement: Any = Placement.__new__(Placement)
    placement.pipe = object()
    placement.active = StreamedOffload()
    placement._held = None
    placement._allocated_before = {0: before}
    return placement


def test_what_the_allocator_handed_out_since_loading_counts_as_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    # 9 GiB of weights, 72 MiB of workspaces since loading, 300 MiB someone else held before we loaded
    placement = _placement(monkeypatch, 9 * 1024 * MIB, (300 + 9 * 1024 + 72) * MIB, 300 * MIB)
    assert placement.held_bytes() == {0: (9 * 1024 + 72) * MIB}


def test_never_less_than_our_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    # 500 MiB someone else held before we loaded, 600 MiB of theirs freed since: the difference undercounts us
    placement = _placement(monkeypatch, 4 * 1024 * MIB, (500 + 4 * 1024 - 600) * MIB, 500 * MIB)
    assert placement.held_bytes() == {0: 4 * 1024 * MIB}


def test_another_models_weights_loaded_since_count_only_up_to_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # 6 GiB of someone else's model loaded onto the card after ours: at most UNTRACKED_MAX of it passes for ours
    placement = _placement(monkeypatch, 4 * 1024 * MIB, (4 * 1024 + 6 * 1024) * MIB, 0)
    assert placement.held_bytes() == {0: 4 * 1024 * MIB + UNTRACKED_MAX}
