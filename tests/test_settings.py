from __future__ import annotations

from pathlib import Path

import pytest

from zimage_turbo import InvalidSettingsError, ZImageSettings
from zimage_turbo.settings import DEFAULT_MODEL, STRATEGY_NAMES


def test_defaults() -> None:
    settings = ZImageSettings()
    assert settings.model == DEFAULT_MODEL
    assert settings.source == "auto"
    assert settings.strategy == "auto"
    assert settings.dtype == "auto"
    assert settings.cache_dir is None
    assert settings.offline is False
    assert settings.allow_downscale is False


def test_environment_variables_use_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZIMAGE_MODEL", "/models/z")
    monkeypatch.setenv("ZIMAGE_OFFLINE", "true")
    monkeypatch.setenv("ZIMAGE_VRAM_RESERVE_GIB", "2.5")
    monkeypatch.setenv("ZIMAGE_CACHE_DIR", "~/models")
    settings = ZImageSettings()
    assert settings.model == "/models/z"
    assert settings.offline is True
    assert settings.vram_reserve_gib == 2.5
    assert settings.cache_dir == Path("~/models").expanduser()


def test_arguments_outrank_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZIMAGE_DTYPE", "float16")
    assert ZImageSettings(dtype="float32").dtype == "float32"


def test_dotenv_file_is_read_and_other_variables_in_it_are_ignored(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DATABASE_URL=postgres://x\nZIMAGE_STRATEGY=cpu\nZIMAGE_SOURCE=local\n")
    settings = ZImageSettings()
    assert settings.strategy == "cpu"
    assert settings.source == "local"


def test_a_dotenv_file_that_is_not_utf8_is_ignored_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # another program's file, in another encoding: not ours to refuse
    (tmp_path / ".env").write_bytes("ZIMAGE_STRATEGY=cpu\nGREETING=gr\xfc\xdf dich\n".encode("latin-1"))
    monkeypatch.setenv("ZIMAGE_SOURCE", "local")
    with pytest.warns(RuntimeWarning, match=".env"):
        settings = ZImageSettings(dtype="float32")
    assert settings.strategy == "auto"  # the file was not read
    assert settings.source == "local" and settings.dtype == "float32"  # the environment and arguments were


@pytest.mark.parametrize(
    ("field", "value", "env_name"),
    [
        ("dtype", "fp8", "ZIMAGE_DTYPE"),
        ("strategy", "warp_drive", "ZIMAGE_STRATEGY"),
        ("source", "dropbox", "ZIMAGE_SOURCE"),
        ("vram_reserve_gib", -1, "ZIMAGE_VRAM_RESERVE_GIB"),
        ("vram_budget_gib", 0, "ZIMAGE_VRAM_BUDGET_GIB"),
        ("model", "   ", "ZIMAGE_MODEL"),
        ("offline", "perhaps", "ZIMAGE_OFFLINE"),
    ],
)
def test_invalid_values_fail_at_construction_naming_the_field(field: str, value: object, env_name: str) -> None:
    with pytest.raises(InvalidSettingsError) as caught:
        ZImageSettings(**{field: value})
    assert field in str(caught.value)
    assert env_name in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_invalid_environment_value_fails_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZIMAGE_VRAM_BUDGET_GIB", "lots")
    with pytest.raises(InvalidSettingsError, match="ZIMAGE_VRAM_BUDGET_GIB"):
        ZImageSettings()


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(InvalidSettingsError, match="dtyp"):
        ZImageSettings(dtyp="float32")


def test_strategy_error_lists_the_valid_names() -> None:
    with pytest.raises(InvalidSettingsError) as caught:
        ZImageSettings(strategy="fast")
    for name in STRATEGY_NAMES:
        assert name in str(caught.value)


def test_settings_are_frozen_and_replace_validates() -> None:
    settings = ZImageSettings()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own frozen-instance error
        settings.dtype = "float32"  # type: ignore[misc]
    changed = settings.replace(dtype="float32")
    assert changed.dtype == "float32" and settings.dtype == "auto"
    with pytest.raises(InvalidSettingsError):
        settings.replace(dtype="int3")


def test_replace_does_not_pick_up_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ZImageSettings(dtype="float32")
    monkeypatch.setenv("ZIMAGE_DTYPE", "float16")
    assert settings.replace(model="a/b").dtype == "float32"
