from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zimage_turbo import GenerationRequest, InvalidRequestError
from zimage_turbo.request import DEFAULT_STEPS, MAX_IMAGES, MAX_SEED, MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE


def test_defaults_follow_the_official_schedule() -> None:
    request = GenerationRequest("a cat")
    assert (request.height, request.width) == (1024, 1024)
    assert request.steps == DEFAULT_STEPS == 8
    assert request.guidance_scale == 0.0
    assert request.seed is None and request.seeds == ()


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t", None, b"a cat", 42, ["a cat"], "a\x00cat"])
def test_bad_prompts(prompt: object) -> None:
    with pytest.raises(InvalidRequestError, match="prompt"):
        GenerationRequest(prompt)  # type: ignore[arg-type]


@pytest.mark.parametrize("side", [0, -16, 15, 1000, 240, 2064, 16384, 1024.0, "1024", True, None])
def test_bad_sizes(side: object) -> None:
    with pytest.raises(InvalidRequestError, match="height"):
        GenerationRequest("a cat", height=side)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="width"):
        GenerationRequest("a cat", width=side)  # type: ignore[arg-type]


def test_size_error_suggests_the_nearest_allowed_value() -> None:
    with pytest.raises(InvalidRequestError, match="nearest allowed: 1008"):
        GenerationRequest("a cat", height=1000)


@pytest.mark.parametrize("steps", [0, -1, 2.5, math.nan, 1001, "8", False])
def test_bad_steps(steps: object) -> None:
    with pytest.raises(InvalidRequestError, match="steps"):
        GenerationRequest("a cat", steps=steps)  # type: ignore[arg-type]


@pytest.mark.parametrize("count", [0, -1, MAX_IMAGES + 1, 1.0, True])
def test_bad_image_counts(count: object) -> None:
    with pytest.raises(InvalidRequestError, match="num_images"):
        GenerationRequest("a cat", num_images=count)  # type: ignore[arg-type]


@pytest.mark.parametrize("guidance", [math.nan, math.inf, -1.0, "2", True])
def test_bad_guidance(guidance: object) -> None:
    with pytest.raises(InvalidRequestError, match="guidance_scale"):
        GenerationRequest("a cat", guidance_scale=guidance)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 1.5, "7", True])
def test_bad_seeds(seed: object) -> None:
    with pytest.raises(InvalidRequestError, match="seed"):
        GenerationRequest("a cat", seed=seed)  # type: ignore[arg-type]


def test_seed_range_must_fit_every_image() -> None:
    GenerationRequest("a cat", seed=MAX_SEED)
    with pytest.raises(InvalidRequestError, match="seed"):
        GenerationRequest("a cat", seed=MAX_SEED, num_images=2)


def test_numpy_integers_are_accepted() -> None:
    request = GenerationRequest("a cat", height=np.int64(768), seed=np.uint64(5), guidance_scale=np.float32(0))
    assert request.height == 768 and type(request.height) is int
    assert request.seed == 5


def test_seeds_of_a_batch_are_consecutive() -> None:
    assert GenerationRequest("a cat", seed=10, num_images=3).seeds == (10, 11, 12)


def test_with_seed_draws_a_random_seed_only_when_missing() -> None:
    drawn = GenerationRequest("a cat", num_images=4).with_seed()
    assert drawn.seed is not None and len(drawn.seeds) == 4
    fixed = GenerationRequest("a cat", seed=3)
    assert fixed.with_seed() is fixed


@given(
    height=st.integers(MIN_SIDE // SIDE_MULTIPLE, MAX_SIDE // SIDE_MULTIPLE).map(lambda n: n * SIDE_MULTIPLE),
    width=st.integers(MIN_SIDE // SIDE_MULTIPLE, MAX_SIDE // SIDE_MULTIPLE).map(lambda n: n * SIDE_MULTIPLE),
    steps=st.integers(1, 200),
    count=st.integers(1, MAX_IMAGES),
    seed=st.one_of(st.none(), st.integers(0, 2**63)),
    guidance=st.floats(0, 20, allow_nan=False),
)
def test_every_valid_request_is_accepted(
    height: int, width: int, steps: int, count: int, seed: int | None, guidance: float
) -> None:
    request = GenerationRequest(
        "a cat", height=height, width=width, steps=steps, num_images=count, seed=seed, guidance_scale=guidance
    ).with_seed()
    assert len(request.seeds) == count
    assert all(0 <= s <= MAX_SEED for s in request.seeds)


@given(side=st.integers(-10_000, 10_000).filter(lambda n: n % SIDE_MULTIPLE or not MIN_SIDE <= n <= MAX_SIDE))
def test_every_invalid_side_is_refused_with_our_error(side: int) -> None:
    with pytest.raises(InvalidRequestError):
        GenerationRequest("a cat", height=side)
