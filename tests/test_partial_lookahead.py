"""``partial``'s lookahead: copies of streamed transformer blocks that start before the block ahead of them
computes. The time model against hand-worked timelines, the extra block it holds, the planner's use of both,
and the pacing hook that bounds how far the host runs ahead (with stand-in CUDA events: on the CPU there is no
transfer stream, so the placement installs no pacing; the GPU suite measures the real thing)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from zimage_turbo import FullGPU, GPUInfo, Hardware, ModelProfile, PartialOffload, Workload, ZImageSettings
from zimage_turbo.errors import InvalidSettingsError
from zimage_turbo.hardware import GIB
from zimage_turbo.ladder import Ladder
from zimage_turbo.machine import Machine
from zimage_turbo.planner import candidate_for, plan
from zimage_turbo.strategies.base import LoadStrategy
from zimage_turbo.strategies.partial import DEFAULT_LOOKAHEAD, MAX_LOOKAHEAD
from zimage_turbo.strategies.partial_streaming import Pacer, install_pacing
from zimage_turbo.strategies.residency import Residency, _Split, partial_weights, streamed_blocks
from zimage_turbo.strategies.streaming import BLOCK_OVERHEAD_S, unstream

PROFILE = ModelProfile.z_image_turbo()
H = BLOCK_OVERHEAD_S


class _Bus:
    """A profile whose bus moves one byte per nanosecond: a 1.5e9-byte block takes 1.5 s."""

    @staticmethod
    def transfer_seconds(nbytes: int) -> float:
        return nbytes / 1e9


def _run(resident: int, lookahead: int, *, blocks: int = 6, block_bytes: int = 1_500_000_000) -> float:
    split = _Split((), (), 0, (block_bytes,) * blocks)
    # one second of compute per block
    return split.run_seconds(_Bus(), float(blocks), resident, lookahead)  # type: ignore[arg-type]


def test_lookahead_one_is_the_timeline_of_copies_started_by_the_streamed_block_before() -> None:
    # six blocks, two resident: streamed at 1, 2, 4, 5. Each copy (1.5 s) starts when the streamed block before
    # it starts computing (1 s a block), so the copy of block 4 waits for block 2 although the bus is idle.
    assert streamed_blocks(6, 2) == (1, 2, 4, 5)
    # block 1 starts at max(1, 1.5) + h; 2 at +max(1, 1.5) + h; 4 at +max(2, 1.5) + h; 5 at +max(1, 1.5) + h; +1
    assert _run(2, 1) == pytest.approx(7.5 + 4 * H)


def test_lookahead_two_keeps_the_bus_busy_across_resident_blocks() -> None:
    # copies back to back (they end at 1.5, 3, 4.5, 6), each streamed block starting once its copy is done and
    # the GPU is free: 1 at 1.5 + h, 2 at 3 + h, 4 at 5 + 2h (compute-bound there), 5 at 6 + 3h, done 1 s later
    assert _run(2, 2) == pytest.approx(7 + 3 * H)
    assert _run(2, 2) < _run(2, 1)
    # no faster than either the bus (6 s of copies) or the compute (6 s): the first copy is never hidden
    assert _run(2, 3) >= 6 + 1.5 - 1


@pytest.mark.parametrize("resident", range(7))
def test_more_lookahead_is_never_predicted_slower(resident: int) -> None:
    times = [_run(resident, lookahead) for lookahead in range(1, MAX_LOOKAHEAD + 1)]
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(times)), times
    # and nothing streamed: no copies, whatever the lookahead
    assert _run(6, 1) == _run(6, 4) == pytest.approx(6.0)


def test_each_step_of_lookahead_holds_one_more_streamed_block_while_denoising() -> None:
    residency = Residency(13, 0)
    one, two, three = (partial_weights(PROFILE, residency, lookahead=k) for k in (1, 2, 3))
    largest = max(PROFILE.transformer.block_bytes[i] for i in streamed_blocks(34, 13))
    assert two["denoise"] - one["denoise"] == three["denoise"] - two["denoise"] == largest
    assert one["encode"] == two["encode"] and one["decode"] == two["decode"]


def _card(gib: float) -> Hardware:
    gpu = GPUInfo(0, f"{gib:g} GiB card", int(gib * GIB), int(gib * GIB), (9, 0))
    return Hardware(gpus=(gpu,), host_total_bytes=64 * GIB, host_available_bytes=64 * GIB)


@pytest.mark.parametrize(("gib", "faster"), [(6, True), (8, True), (12, False)])
def test_the_planner_sizes_a_lookahead_placement_within_the_card_and_predicts_it_faster(gib: int, faster: bool) -> None:
    work = Workload()
    one = candidate_for(PartialOffload(lookahead=1), PROFILE, _card(gib), work, reserve_bytes=GIB // 2)
    two = candidate_for(PartialOffload(lookahead=2), PROFILE, _card(gib), work, reserve_bytes=GIB // 2)
    assert isinstance(two.strategy, PartialOffload) and two.strategy.lookahead == 2
    assert one.strategy.residency is not None and two.strategy.residency is not None
    # the block held in flight comes out of the resident ones, never out of the margin
    assert two.strategy.residency.transformer <= one.strategy.residency.transformer
    assert two.peak_bytes * 1.04 <= (gib - 0.5) * GIB
    # where the bus and the compute are close (8 GiB on the H200) the overlap gains; at 12 GiB a pass is bound
    # by its compute (fewer streamed blocks, each hidden behind more resident ones) and the model sees no gain
    assert two.seconds < one.seconds if faster else two.seconds == pytest.approx(one.seconds)


def test_lookahead_is_checked_and_carried_through_sizing_and_halving() -> None:
    for bad in (0, MAX_LOOKAHEAD + 1, True, 2.0, "2"):
        with pytest.raises(InvalidSettingsError, match="lookahead"):
            PartialOffload(lookahead=bad)  # type: ignore[arg-type]
    strategy = PartialOffload(transformer_blocks=12, text_encoder_blocks=4, lookahead=3)
    assert "lookahead=3" in repr(strategy) and "lookahead" not in repr(PartialOffload())
    assert strategy.label == "partial(12,4)+lookahead3" and PartialOffload(quantize="fp8").label == "partial+fp8"
    halved = strategy.smaller("denoise")
    assert isinstance(halved, PartialOffload) and halved.lookahead == 3 and halved.transformer_blocks == 6
    # the default is the measured one; the label and repr name any other
    assert PartialOffload().lookahead == DEFAULT_LOOKAHEAD == 2
    one = PartialOffload(lookahead=1)
    assert one.label == "partial+lookahead1" and "lookahead=1" in repr(one)
    # strategy="partial" with quantization="fp8": the same placement, quantized
    machine = Machine(ZImageSettings(calibrate=False), None)
    machine.quantize, machine.prefer_lossless = "fp8", False
    quantized = machine.quantized_variant(strategy, by_name=True)
    assert isinstance(quantized, PartialOffload) and quantized.label == "partial(12,4)+fp8+lookahead3"
    assert (quantized.lookahead, quantized.residency, strategy.quantize) == (3, Residency(12, 4), None)


def _ladder(active: LoadStrategy, requested: LoadStrategy | None) -> Ladder:
    placement = SimpleNamespace(
        active=active, requested=requested, profile=PROFILE, tile_from=None, unplaceable=set(), broken=set()
    )
    return Ladder(placement, requested=requested, plan_for=None, run=None, allow_downscale=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("requested", [PartialOffload(lookahead=3), PartialOffload(transformer_blocks=None)])
def test_a_named_strategy_that_no_longer_fits_is_sized_again_not_swapped_for_the_planners_pick(
    requested: PartialOffload,
) -> None:
    """Sized at load for a larger card (or more free memory) than the request now sees: the ladder sizes the
    user's strategy again (same lookahead) instead of taking the plan's best, which is a different placement."""
    at_load = candidate_for(requested, PROFILE, _card(12), Workload(), reserve_bytes=GIB // 2).strategy
    ranked = plan(PROFILE, _card(8), Workload())
    assert not candidate_for(at_load, PROFILE, _card(8), Workload(), reserve_bytes=GIB // 2).fits
    [first, *_] = _ladder(at_load, requested).rungs(ranked)
    again = candidate_for(requested, PROFILE, _card(8), Workload(), reserve_bytes=GIB // 2)
    assert first.strategy == again.strategy and first.fits
    assert isinstance(first.strategy, PartialOffload) and first.strategy.lookahead == requested.lookahead
    # under 'auto' the same placement gives way to the plan's best
    [best, *_] = _ladder(at_load, None).rungs(ranked)
    assert best == ranked.fitting[0]


def test_a_named_strategy_that_cannot_fit_the_request_gives_way_to_the_plan() -> None:
    """A fallback in use that no longer fits, with the named strategy unable to fit either (its counts fixed):
    the plan's best comes first, not a strategy known to be too large."""
    named = PartialOffload(transformer_blocks=34, text_encoder_blocks=36)
    in_use = candidate_for(PartialOffload(lookahead=1), PROFILE, _card(12), Workload(), reserve_bytes=GIB // 2)
    ranked = plan(PROFILE, _card(8), Workload())
    assert not candidate_for(named, PROFILE, _card(8), Workload(), reserve_bytes=GIB // 2).fits
    [first, *_] = _ladder(in_use.strategy, named).rungs(ranked)
    assert first == ranked.fitting[0] and first.fits


@dataclass
class _Mark:
    """A stand-in for a recorded CUDA event: what was asked of it, in one log shared by all."""

    index: int
    log: list[str]

    def synchronize(self) -> None:
        self.log.append(f"wait {self.index}")


def _marks(log: list[str]) -> Any:
    made = iter(range(1000))

    def mark() -> _Mark:
        index = next(made)
        log.append(f"record {index}")
        return _Mark(index, log)

    return mark


@pytest.mark.parametrize(("lookahead", "waits"), [(2, [None, 0, 1, 2, 3]), (3, [None, None, 0, 1, 2])])
def test_the_pacer_waits_for_the_gpu_to_reach_the_streamed_block_lookahead_minus_one_back(
    lookahead: int, waits: list[int | None]
) -> None:
    log: list[str] = []
    pacer = Pacer(lookahead, _marks(log))
    for k, wait in enumerate(waits):
        log.clear()
        pacer.arrived()
        assert log == [f"record {k}"] + ([] if wait is None else [f"wait {wait}"])


def test_pacing_runs_before_the_blocks_other_hooks_and_goes_with_unstream() -> None:
    from diffusers.hooks import HookRegistry, ModelHook

    log: list[str] = []

    class Offloading(ModelHook):  # stands for diffusers' group offloading hook, registered first
        group = SimpleNamespace(cpu_param_dict={})

        def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            log.append("offloading")
            return args, kwargs

    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))
    HookRegistry.check_if_exists_or_initialize(model)  # as stream_blocks gives the module its own hook
    for block in model:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(Offloading(), "group_offloading")
    install_pacing(list(model), 2, _marks(log))
    model(torch.ones(1, 4))
    assert log == ["record 0", "offloading", "record 1", "wait 0", "offloading", "record 2", "wait 1", "offloading"]

    unstream(model, SimpleNamespace(send_home=lambda module: None))
    log.clear()
    model(torch.ones(1, 4))
    assert log == []
    assert all(not HookRegistry.check_if_exists_or_initialize(block).hooks for block in model)


def test_a_lookahead_placement_gives_the_full_gpu_image_and_paces_only_where_copies_stream(
    tiny_checkpoint: Path,
) -> None:
    from test_generator import same
    from test_partial import PROMPT, SIZE, generator, partial

    full = generator(tiny_checkpoint, FullGPU(device="cpu")).generate(PROMPT, seed=5, **SIZE)
    gen = generator(tiny_checkpoint, partial(2, 1, lookahead=2))
    result = gen.generate(PROMPT, seed=5, **SIZE)
    assert result.strategy == "partial" and result.fallbacks == ()
    assert same(result.image, full.image)
    # on the CPU nothing crosses a bus, so no block is paced (on CUDA each streamed transformer block is)
    blocks = [module for module in gen.pipeline.transformer.modules() if hasattr(module, "_diffusers_hook")]
    assert blocks and not any(b._diffusers_hook.get_hook("zimage_turbo_pace") for b in blocks)
