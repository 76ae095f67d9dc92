"""Property-based tests of input validation: every valid request is accepted as given, every invalid one is
refused with InvalidRequestError naming the field, and nothing is loaded on the way.

Each property runs a bounded number of examples with no deadline, so the whole file takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zimage_turbo import (
    Generator,
    InvalidRequestError,
    InvalidSettingsError,
    ZImageSettings,
)
from zimage_turbo.cli_plan import parse_size as _parse_size
from zimage_turbo.request import (
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    SIDE_MULTIPLE,
    GenerationRequest,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sides = st.integers(MIN_SIDE // SIDE_MULTIPLE, MAX_SIDE // SIDE_MULTIPLE).map(lambda n: n * SIDE_MULTIPLE)
prompts = st.text(min_size=1, max_size=300).filter(lambda t: t.strip() and "\x00" not in t)


@st.composite
def valid_fields(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(1, MAX_IMAGES))
    return {
        "prompt": draw(prompts),
        "height": draw(sides),
        "width": draw(sides),
        "steps": draw(st.integers(1, MAX_STEPS)),
        "guidance_scale": draw(st.floats(0, 50, allow_nan=False)),
        "negative_prompt": draw(st.none() | prompts),
        "num_images": count,
        "seed": draw(st.none() | st.integers(0, MAX_SEED - count + 1)),
    }


def _not_an_int() -> st.SearchStrategy[object]:
    """Values that are not integers, as callers get them wrong: floats, numeric strings, bools, None, lists."""
    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(10**6), 10**6).map(str),
        st.booleans(),
        st.none(),
        st.lists(st.integers(), max_size=2),
        st.binary(max_size=4),
    )


def _invalid(field: str) -> st.SearchStrategy[object]:
    """Values that must be refused for ``field`` whatever the other fields are."""
    if field in ("height", "width"):
        out_of_range = st.integers(-(10**9), 10**9).filter(
            lambda n: n % SIDE_MULTIPLE != 0 or not MIN_SIDE <= n <= MAX_SIDE
        )
        return out_of_range | _not_an_int()
    if field == "steps":
        return st.integers(-(10**9), 10**9).filter(lambda n: not 1 <= n <= MAX_STEPS) | _not_an_int()
    if field == "num_images":
        return st.integers(-(10**9), 10**9).filter(lambda n: not 1 <= n <= MAX_IMAGES) | _not_an_int()
    if field == "seed":
        negative_or_huge = st.integers(max_value=-1) | st.integers(min_value=MAX_SEED + 1)
        return negative_or_huge | _not_an_int().filter(lambda v: v is not None)
    if field == "guidance_scale":
        return st.one_of(
            st.floats(max_value=-1e-9, allow_nan=False),
            st.sampled_from([math.nan, math.inf, -math.inf]),
            st.text(max_size=4),
            st.booleans(),
            st.none(),
            st.lists(st.floats(), max_size=1),
        )
    if field in ("prompt", "negative_prompt"):
        blank = st.text(alphabet=" \t\n\r\x0b\x0c", max_size=5)
        with_nul = st.tuples(st.text(max_size=5), st.text(max_size=5)).map(lambda p: p[0] + "\x00" + p[1])
        surrogate = st.sampled_from(["\ud800", "a\udfffb"])
        too_long = st.integers(MAX_PROMPT_CHARS + 1, MAX_PROMPT_CHARS + 50).map(lambda n: "a" * n)
        wrong_type = st.one_of(st.binary(max_size=5), st.integers(), st.lists(st.text(max_size=3), max_size=2))
        values = with_nul | surrogate | too_long | wrong_type
        # None means "no negative prompt"; a blank negative prompt is as harmless as none
        return values | blank if field == "prompt" else values
    raise AssertionError(field)


FIELDS = ["prompt", "height", "width", "steps", "guidance_scale", "negative_prompt", "num_images", "seed"]


@FAST
@given(fields=valid_fields())
def test_valid_requests_construct_and_round_trip(fields: dict[str, Any]) -> None:
    request = GenerationRequest(**fields)
    assert dataclasses.asdict(request) == {**fields, "inputs": None}  # text-to-image: no input images
    assert GenerationRequest(**dataclasses.asdict(request)) == request
    drawn = request.with_seed()
    assert drawn.seed is not None and len(drawn.seeds) == fields["num_images"]
    assert drawn.seeds == tuple(range(drawn.seed, drawn.seed + fields["num_images"]))
    assert all(0 <= seed <= MAX_SEED for seed in drawn.seeds)


@FAST
@given(fields=valid_fields(), data=st.data())
def test_numpy_scalars_are_accepted_as_plain_numbers(fields: dict[str, Any], data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from([np.int64, np.int32, np.uint32]))
    converted = {k: kind(v) if k in ("height", "width", "steps", "num_images") else v for k, v in fields.items()}
    converted["guidance_scale"] = np.float64(fields["guidance_scale"])
    request = GenerationRequest(**converted)
    assert dataclasses.asdict(request) == {**fields, "inputs": None}  # text-to-image: no input images
    assert all(type(getattr(request, k)) is int for k in ("height", "width", "steps", "num_images"))


@FAST
@given(fields=valid_fields(), field=st.sampled_from(FIELDS), data=st.data())
def test_an_invalid_field_is_refused_naming_it(fields: dict[str, Any], field: str, data: st.DataObject) -> None:
    fields[field] = data.draw(_invalid(field), label=field)
    with pytest.raises(InvalidRequestError) as caught:
        GenerationRequest(**fields)
    assert field in str(caught.value)
    assert isinstance(caught.value, ValueError)


@FAST
@given(count=st.integers(1, MAX_IMAGES), overshoot=st.integers(0, 2**70))
def test_seed_ranges_past_the_largest_seed_are_refused(count: int, overshoot: int) -> None:
    seed = MAX_SEED - count + 2 + overshoot
    if count == 1 and overshoot == 0:
        seed += 1  # MAX_SEED + 1 for a single image
    with pytest.raises(InvalidRequestError, match="seed"):
        GenerationRequest("a cat", seed=seed, num_images=count)


@pytest.fixture(scope="module")
def unloadable(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    """A Generator whose model does not exist: if validation let anything through, loading would fail with
    a different error (ModelNotFoundError), never InvalidRequestError."""
    return Generator(model=tmp_path_factory.mktemp("nowhere") / "model", settings=ZImageSettings(progress=False))


@FAST
@given(fields=valid_fields(), field=st.sampled_from(FIELDS), data=st.data())
def test_generate_refuses_invalid_arguments_before_loading(
    unloadable: Generator, fields: dict[str, Any], field: str, data: st.DataObject
) -> None:
    # generate() reads steps=None and num_images=None as their defaults (they have a second, diffusers' name), and
    # height=None and width=None as 1024 (or, with an input image, its size)
    defaults = ("steps", "num_images", "height", "width")
    fields[field] = data.draw(_invalid(field).filter(lambda v: v is not None or field not in defaults), label=field)
    prompt = fields.pop("prompt")
    fields["steps"] = fields["steps"] if field == "steps" else 1
    with pytest.raises(InvalidRequestError, match=field):
        unloadable.generate(prompt, **fields)
    assert not unloadable.is_loaded


@FAST
@given(
    prompts_=st.lists(prompts, max_size=4),
    bad_index=st.integers(0, 3),
    bad=st.sampled_from(["", "  ", "a\x00b", 7, None, b"bytes"]),
)
def test_generate_many_validates_every_prompt_before_loading(
    unloadable: Generator, prompts_: list[str], bad_index: int, bad: object
) -> None:
    batch: list[Any] = list(prompts_)
    batch.insert(min(bad_index, len(batch)), bad)
    with pytest.raises(InvalidRequestError, match="prompt"):
        unloadable.generate_many(batch, steps=1)
    assert not unloadable.is_loaded


@FAST
@given(callback=st.one_of(st.integers(), st.text(max_size=3), st.just(object())))
def test_a_callback_that_is_not_callable_is_refused_before_loading(unloadable: Generator, callback: object) -> None:
    with pytest.raises(InvalidRequestError, match="callback"):
        unloadable.generate("a cat", callback=callback)  # type: ignore[arg-type]
    assert not unloadable.is_loaded


def test_an_empty_prompt_list_loads_nothing_but_still_checks_the_arguments(unloadable: Generator) -> None:
    assert unloadable.generate_many([]) == []
    with pytest.raises(InvalidRequestError, match="height"):
        unloadable.generate_many([], height=1000)
    assert not unloadable.is_loaded


# -- settings from the environment -------------------------------------------------------------------------

NUMERIC_SETTINGS = {"vram_reserve_gib": (0.0, 1024.0, True), "vram_budget_gib": (0.0, 1024.0, False)}


env_numbers = st.one_of(
    st.text(max_size=12),
    st.floats().map(str),
    st.integers(-10, 2000).map(str),
    st.floats(-10, 2000).map(lambda v: f"{v:.3g}"),
).filter(lambda t: "\x00" not in t)


@FAST
@given(field=st.sampled_from(sorted(NUMERIC_SETTINGS)), text=env_numbers)
def test_numeric_settings_from_the_environment_are_in_range_or_refused_naming_the_variable(
    field: str, text: str
) -> None:
    low, high, low_allowed = NUMERIC_SETTINGS[field]
    variable = f"ZIMAGE_{field.upper()}"
    with mock.patch.dict(os.environ, {variable: text}):
        try:
            value = getattr(ZImageSettings(), field)
        except InvalidSettingsError as exc:
            assert variable in str(exc)
            return
    if field == "vram_budget_gib" and value is None:
        return  # an empty value means unset
    assert math.isfinite(value) and (low <= value if low_allowed else low < value) and value <= high


@FAST
@given(
    field=st.sampled_from(["dtype", "strategy", "source", "offline", "allow_downscale", "progress"]),
    text=st.text(max_size=12).filter(lambda t: "\x00" not in t),
)
def test_choice_settings_from_the_environment_are_valid_or_refused_naming_the_variable(field: str, text: str) -> None:
    variable = f"ZIMAGE_{field.upper()}"
    with mock.patch.dict(os.environ, {variable: text}):
        try:
            value = getattr(ZImageSettings(), field)
        except InvalidSettingsError as exc:
            assert variable in str(exc)
            return
    annotation = ZImageSettings.model_fields[field].annotation
    assert isinstance(value, bool) if annotation is bool else isinstance(value, str)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ZIMAGE_CACHE_DIR", "", "must not be blank"),
        ("ZIMAGE_CACHE_DIR", "   ", "must not be blank"),
        ("ZIMAGE_REVISION", " ", "must not be blank"),
        ("ZIMAGE_VRAM_RESERVE_GIB", "nan", "finite"),
        ("ZIMAGE_VRAM_BUDGET_GIB", "inf", "finite"),
    ],
)
def test_blank_or_non_finite_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidSettingsError, match=message) as caught:
        ZImageSettings()
    assert variable in str(caught.value)


def test_generator_refuses_wrong_settings_and_model_types_before_loading(tmp_path: Path) -> None:
    with pytest.raises(InvalidSettingsError, match="ZImageSettings"):
        Generator(settings={"model": "x"})  # type: ignore[arg-type]
    with pytest.raises(InvalidSettingsError, match="model"):
        Generator(model=42)  # type: ignore[arg-type]
    with pytest.raises(InvalidSettingsError, match="model"):
        Generator(model="   ")


# -- the command line's size option -----------------------------------------------------------------------


@FAST
@given(text=st.text(max_size=12))
def test_size_option_parses_or_is_refused_with_our_error(text: str) -> None:
    try:
        width, height = _parse_size(text)
    except InvalidRequestError as exc:
        assert "--size" in str(exc)
        return
    assert width >= 0 and height >= 0
