"""How many blocks ``partial`` keeps resident, and when ``auto`` picks it: pure planning for hand-built cards of
4 to 24 GiB with the real model's sizes, at the H200's speeds and at those of a PCIe 4.0 consumer card."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zimage_turbo import DeviceSpeeds, GPUInfo, Hardware, ModelProfile, PartialOffload, Workload, plan
from zimage_turbo.hardware import GIB
from zimage_turbo.planner import HOST_COPIES_MARGIN, TILING_MARGIN, Candidate, candidate_for
from zimage_turbo.strategies import residency as residency_module
from zimage_turbo.strategies.residency import (
    NEAR_TIE,
    Residency,
    partial_weights,
    size_residency,
    streamed_blocks,
)

PROFILE = ModelProfile.z_image_turbo()
H200 = None  # no measured speeds: the calibration GPU's (51.6 GiB/s, 770 TFLOP/s)
# An RTX 4070-class card on PCIe 4.0: about 25 GB/s pinned, 80-170 TFLOP/s dense bf16.
PCIE4 = DeviceSpeeds(h2d_gib_per_s=23.0, bf16_tflops=120.0, name="PCIe 4.0 consumer card", source="given")
RESERVE = GIB // 2


def card(gib: float, speeds: DeviceSpeeds | None = H200) -> Hardware:
    gpu = GPUInfo(0, f"{gib:g} GiB card", int(gib * GIB), int(gib * GIB), (8, 9), speeds=speeds)
    return Hardware(gpus=(gpu,), host_total_bytes=64 * GIB, host_available_bytes=64 * GIB)


def sized(gib: float, work: Workload | None = None, speeds: DeviceSpeeds | None = H200, **options: Any) -> Candidate:
    strategy = PartialOffload(**options)
    return candidate_for(strategy, PROFILE, card(gib, speeds), work or Workload(), reserve_bytes=RESERVE)


def counts(candidate: Candidate) -> Residency:
    assert isinstance(candidate.strategy, PartialOffload) and candidate.strategy.residency is not None
    return candidate.strategy.residency


def resident_bytes(candidate: Candidate) -> int:
    return partial_weights(PROFILE, counts(candidate))["decode"]  # what stays on the card through every phase


@pytest.mark.parametrize(
    ("speeds", "expected"),
    [
        # 1024x1024: mid-size cards keep what fits instead of streaming all 34 blocks at every pass
        # (at 16 GiB hybrid ranks first: partial is predicted faster by less than STREAMING_MARGIN)
        (H200, {4: "partial", 6: "partial", 8: "partial", 12: "partial", 16: "hybrid", 24: "full_gpu"}),
        (PCIE4, {4: "partial", 6: "partial", 8: "partial", 12: "partial", 16: "hybrid", 24: "full_gpu"}),
    ],
    ids=["h200", "pcie4"],
)
def test_what_auto_picks_on_each_card(speeds: DeviceSpeeds | None, expected: dict[int, str]) -> None:
    for gib, name in expected.items():
        best = plan(PROFILE, card(gib, speeds)).best
        assert best is not None and best.strategy.name == name, (gib, best)
        assert best.peak_bytes * 1.04 <= (gib - 0.5) * GIB
        streamed = next(c for c in plan(PROFILE, card(gib, speeds)).candidates if c.name == "streamed")
        assert best.seconds < streamed.seconds  # never slower than streaming every block, even at 4 GiB


def test_a_tiled_decode_must_be_clearly_faster_to_be_chosen() -> None:
    # at 8 GiB with lookahead 1, tiling frees room for more resident blocks, predicted 2% faster (it ran 5%
    # slower on the H200); with the default lookahead of 2 the untiled split is predicted faster anyway
    ranked = plan(PROFILE, card(8), strategies=[PartialOffload(lookahead=1)])
    tiled = next(c for c in ranked.fitting if c.vae_tiling and c.strategy.name == "partial")
    assert ranked.best is not None and not ranked.best.vae_tiling and ranked.best.strategy.name == "partial"
    assert tiled.seconds < ranked.best.seconds < tiled.seconds * (1 + TILING_MARGIN)
    # where only a tiled decode fits, it is still chosen
    large = plan(PROFILE, card(6), Workload(2048, 2048)).best
    assert large is not None and large.vae_tiling


def test_the_time_model_runs_on_the_cards_own_speeds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(residency_module, "NEAR_TIE", 0.0)  # the model's own optimum, no tie-break
    h200, pcie = plan(PROFILE, card(12)), plan(PROFILE, card(12, PCIE4))
    assert h200.best is not None and pcie.best is not None
    # at 120 TFLOP/s a pass is compute-bound however many blocks stream: seconds scale with the matmul rate
    assert 4.5 < pcie.best.seconds / h200.best.seconds < 6.5
    # the transformer's resident blocks barely pay there (their copies hide behind the slow compute), so the
    # PCIe card keeps fewer of them and more of the text encoder's, whose copies nothing hides
    h200_8, pcie_8 = counts(sized(8)), counts(sized(8, speeds=PCIE4))
    assert pcie_8.transformer < h200_8.transformer and pcie_8.text_encoder > h200_8.text_encoder
    assert "PCIe 4.0 consumer card: 23.0 GiB/s" in pcie.describe() and "H200" in h200.footnote


@pytest.mark.parametrize("speeds", [H200, PCIE4])
def test_near_ties_keep_more_transformer_blocks_and_a_little_less_memory_changes_nothing(
    speeds: DeviceSpeeds, monkeypatch: pytest.MonkeyPatch
) -> None:
    for gib in (6, 8, 12, 16):
        chosen = sized(gib, speeds=speeds)
        # 100 MB less free memory (the allocator's workspaces) gives up at most a block's worth, no other split
        less = sized(gib - 0.1, speeds=speeds)
        assert counts(chosen).transformer - 1 <= counts(less).transformer <= counts(chosen).transformer, gib
        assert 0 <= resident_bytes(chosen) - resident_bytes(less) < 0.5 * GIB, gib
        with monkeypatch.context() as exact:
            exact.setattr(residency_module, "NEAR_TIE", 0.0)
            fastest = sized(gib, speeds=speeds)
        # never more than NEAR_TIE slower than the model's optimum, and never fewer transformer blocks
        assert chosen.seconds <= fastest.seconds * (1 + NEAR_TIE) + 1e-9
        assert counts(chosen).transformer >= counts(fastest).transformer
    # the case that made the rule: at 12 GiB on the H200 the optimum moved from (18,9) to (12,19) with 0.1 GiB
    if speeds is H200:
        with monkeypatch.context() as exact:
            exact.setattr(residency_module, "NEAR_TIE", 0.0)
            assert counts(sized(12, speeds=speeds)) != counts(sized(11.9, speeds=speeds))


def test_resident_blocks_grow_with_memory_and_shrink_with_resolution() -> None:
    for speeds in (H200, PCIE4):
        by_memory = [resident_bytes(sized(gib, speeds=speeds)) for gib in (4, 6, 8, 12, 16)]
        assert by_memory == sorted(by_memory) and len(set(by_memory)) == len(by_memory), speeds
        by_size = [resident_bytes(sized(12, Workload(side, side), speeds)) for side in (512, 768, 1024, 1536)]
        assert by_size == sorted(by_size, reverse=True) and len(set(by_size)) == len(by_size), speeds
    transformer = [counts(sized(gib)).transformer for gib in (4, 6, 8, 12)]
    assert transformer == sorted(transformer) and transformer[0] < transformer[-1]


@settings(max_examples=40, deadline=None)
@given(
    gib=st.floats(3.5, 24),
    more=st.floats(0, 8),
    side=st.sampled_from([512, 768, 1024, 1536, 2048]),
    pcie=st.booleans(),
    tiling=st.booleans(),
)
def test_the_sized_placement_fits_and_more_memory_is_never_slower(
    gib: float, more: float, side: int, pcie: bool, tiling: bool
) -> None:
    work = Workload(side, side, vae_tiling=tiling)
    speeds = PCIE4 if pcie else H200
    smaller, bigger = sized(gib, work, speeds), sized(gib + more, work, speeds)
    if smaller.fits:
        assert smaller.peak_bytes * 1.04 <= (gib - 0.5) * GIB  # the peak of every phase, margin included
        # (near ties go to more transformer blocks: the bigger card's choice may be up to NEAR_TIE above its
        # optimum, which is never slower than the smaller card's)
        assert bigger.fits and bigger.seconds <= smaller.seconds * (1 + NEAR_TIE) + 1e-9
    else:  # even with nothing resident it does not fit
        assert counts(smaller) == Residency(0, 0)


def test_counts_given_are_kept_and_the_rest_is_sized() -> None:
    fixed = sized(12, transformer_blocks=10)
    assert counts(fixed).transformer == 10 and counts(fixed).text_encoder > counts(sized(12)).text_encoder
    assert counts(sized(12, transformer_blocks=5, text_encoder_blocks=3)) == Residency(5, 3)
    assert sized(12).strategy.label.startswith("partial(") and PartialOffload().label == "partial"
    with pytest.raises(Exception, match="transformer_blocks must be None or a whole number"):
        PartialOffload(transformer_blocks=-1)


def test_streamed_blocks_are_spread_out_and_the_first_stays_when_it_can() -> None:
    assert streamed_blocks(34, 34) == ()
    assert streamed_blocks(34, 0) == tuple(range(34))
    assert streamed_blocks(34, 33) == (33,)
    spread = streamed_blocks(34, 17)
    assert len(spread) == 17 and spread[0] > 0 and spread[-1] == 33
    assert {b - a for a, b in itertools.pairwise(spread)} == {2}


def test_nothing_fits_gives_no_residency() -> None:
    compute = PROFILE.compute_seconds(Workload(), 8)
    assert size_residency(PROFILE, Workload(), compute, 8, capacity=GIB) is None
    too_small = sized(2.5)
    assert not too_small.fits and counts(too_small) == Residency(0, 0)


def test_halving_on_out_of_memory() -> None:
    strategy = PartialOffload(transformer_blocks=20, text_encoder_blocks=6, quantize="fp8")
    assert strategy.smaller("denoise") == PartialOffload(transformer_blocks=10, text_encoder_blocks=6, quantize="fp8")
    assert strategy.smaller("decode") == PartialOffload(transformer_blocks=10, text_encoder_blocks=6, quantize="fp8")
    assert strategy.smaller("encode") == PartialOffload(transformer_blocks=20, text_encoder_blocks=3, quantize="fp8")
    assert strategy.smaller("place") == PartialOffload(transformer_blocks=10, text_encoder_blocks=3, quantize="fp8")
    assert PartialOffload(transformer_blocks=0, text_encoder_blocks=1).smaller("denoise") == PartialOffload(
        transformer_blocks=0, text_encoder_blocks=0
    )
    assert PartialOffload(transformer_blocks=0, text_encoder_blocks=0).smaller("place") is None
    assert PartialOffload().smaller("denoise") is None  # not sized: nothing to halve


def test_quantized_partial_keeps_more_blocks_and_ranks_as_a_quantized_placement() -> None:
    assert counts(sized(8, quantize="fp8")).transformer >= 2 * counts(sized(8)).transformer  # half the bytes each
    ranked = plan(PROFILE, card(8), quantize="fp8")
    assert ranked.best is not None and ranked.best.strategy.quantize == "fp8"  # below lossless only where those
    # keep the transformer on the GPU; here every lossless placement streams some of it
    lossless = [c for c in ranked.fitting if c.strategy.quantize is None]
    assert lossless and all(ranked.fitting.index(c) > 0 for c in lossless)


@pytest.mark.parametrize("speeds", [H200, PCIE4, DeviceSpeeds(h2d_gib_per_s=51.5, bf16_tflops=773.0, source="given")])
def test_a_partial_placement_that_streams_nothing_ranks_after_full_gpu(speeds: DeviceSpeeds | None) -> None:
    # On a card that holds everything, partial keeps every block resident: the same predicted speed as full_gpu,
    # but with pinned host copies of the whole model; the order of the candidates must not decide.
    ranked = plan(PROFILE, card(139, speeds))
    best, partial = ranked.best, next(c for c in ranked.fitting if c.strategy.name == "partial")
    assert best is not None and best.strategy.name == "full_gpu"
    assert counts(partial).transformer == len(PROFILE.transformer.block_bytes)
    assert partial.seconds == pytest.approx(best.seconds, rel=1e-3) and partial.margin == HOST_COPIES_MARGIN
    assert partial.ranking_seconds > best.ranking_seconds


@pytest.mark.parametrize("inputs", [(1,), (1, 1)], ids=["image_to_image", "inpaint"])
def test_partial_counts_the_image_encoder_as_every_placement_does(inputs: tuple[int, ...]) -> None:
    # It was left out, so that for image tasks partial was predicted faster than full_gpu with the same weights
    # resident, and auto chose it for the tiny checkpoint's ControlNet request on the H200 (2026-11-29).
    work = Workload(image_encodes=inputs)
    ranked = plan(PROFILE, card(139), work)
    best, partial = ranked.best, next(c for c in ranked.fitting if c.strategy.name == "partial")
    assert best is not None and best.strategy.name == "full_gpu"
    assert partial.seconds == pytest.approx(best.seconds, rel=1e-9)
    assert partial.seconds > plan(PROFILE, card(139)).best.seconds  # type: ignore[union-attr]
