"""Settings: one validated object, filled from arguments, ``ZIMAGE_*`` environment variables and ``.env``.

Precedence, highest first: keyword arguments, environment variables, the ``.env`` file in the current
directory, the defaults below. Settings are read when you build a ``ZImageSettings`` (or a ``Generator``
without one), never at import time, so importing the library never reads a stray ``.env``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import InvalidSettingsError

__all__ = [
    "DEFAULT_MODEL",
    "STRATEGY_NAMES",
    "AttentionName",
    "CompileMode",
    "DtypeName",
    "QuantizationSetting",
    "SourceName",
    "StrategyName",
    "ZImageSettings",
    "library_cache_dir",
    "settings_and_options",
]

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
ENV_PREFIX = "ZIMAGE_"

SourceName = Literal["auto", "huggingface", "modelscope", "local"]
DtypeName = Literal["auto", "bfloat16", "float16", "float32"]
# "auto" lets the library choose; the others name a LoadStrategy (see zimage_turbo.strategies).
StrategyName = Literal[
    "auto",
    "full_gpu",
    "multi_gpu",
    "multi_gpu_hybrid",
    "hybrid",
    "partial",
    "model_offload",
    "streamed",
    "sequential_offload",
    "cpu",
]
STRATEGY_NAMES: tuple[str, ...] = get_args(StrategyName)
# See zimage_turbo.speedups for what each does.
AttentionName = Literal["auto", "native", "flash", "cudnn", "efficient", "math", "flash_attn", "flash_attn_3", "sage"]
CompileMode = Literal["auto", "on", "all", "off"]
QuantizationSetting = Literal["none", "auto", "fp8", "int8"]
ConvertedCopy = Literal["auto", "off"]


class ZImageSettings(BaseSettings):
    """Everything that configures how the model is found, loaded and run.

    Each field can also be set through an environment variable named ``ZIMAGE_<FIELD>`` (for example
    ``ZIMAGE_CACHE_DIR``), or a line of that form in a ``.env`` file. Invalid values raise
    :class:`~zimage_turbo.errors.InvalidSettingsError` at construction, naming the field.

    Examples:
        >>> settings = ZImageSettings(dtype="bfloat16", vram_reserve_gib=2)
        >>> settings.dtype, settings.vram_reserve_gib
        ('bfloat16', 2.0)
        >>> settings.replace(strategy="streamed").strategy  # settings are frozen: replace() makes new ones
        'streamed'
        >>> ZImageSettings(dtype="fp8")
        Traceback (most recent call last):
        zimage_turbo.errors.InvalidSettingsError: Invalid zimage-turbo settings:
          dtype (env ZIMAGE_DTYPE): Input should be 'auto', 'bfloat16', 'float16' or 'float32'; got 'fp8'
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        # A .env file usually holds other programs' variables too: ignore them. Misspelt keyword
        # arguments are still refused, in __init__ below.
        extra="ignore",
        frozen=True,
        validate_default=True,
    )

    model: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="A Hugging Face / ModelScope repo id ('owner/name') or a local folder.",
    )
    source: SourceName = Field(
        "auto",
        description="Where to look: 'auto' tries a local folder, then the Hugging Face and ModelScope "
        "caches, then downloads (Hugging Face first).",
    )
    cache_dir: Path | None = Field(
        None,
        description="Root of the model caches, like HF_HOME and MODELSCOPE_CACHE: Hugging Face files go "
        "under <cache_dir>/hub, ModelScope files under <cache_dir>/models. Unset: each hub's own "
        "variables (HF_HUB_CACHE, HF_HOME, MODELSCOPE_CACHE) or its default.",
    )
    revision: str | None = Field(None, min_length=1, description="Branch, tag or commit on the hub.")
    controlnet: str | None = Field(
        None,
        min_length=1,
        description="The ControlNet that requests with a control_image use: a folder in diffusers' layout (or a "
        "model folder holding one named controlnet), a single .safetensors file, or a Hugging Face / ModelScope "
        "repo id ('owner/name', or 'owner/name/file.safetensors' for one file of a repo), found like the model. "
        "Loaded at the first such request.",
    )
    offline: bool = Field(
        False, description="Never touch the network; use caches only (HF_HUB_OFFLINE=1 has the same effect)."
    )
    dtype: DtypeName = Field(
        "auto",
        description="Weight and compute dtype. 'auto': bfloat16 on GPUs that support it natively "
        "(compute capability 8.0+) and on Apple MPS, float32 on CPUs and older GPUs.",
    )
    strategy: StrategyName = Field("auto", description="How to place the model: 'auto' or a strategy name.")
    vram_reserve_gib: float = Field(
        0.5,
        ge=0,
        le=1024,
        allow_inf_nan=False,
        description="GPU memory (GiB) the planner leaves free on each card, beyond what the card reports free "
        "(the CUDA context and other programs are already outside that).",
    )
    vram_budget_gib: float | None = Field(
        None,
        gt=0,
        le=1024,
        allow_inf_nan=False,
        description="Use at most this much memory (GiB) per GPU, for cards shared with other programs.",
    )
    allow_downscale: bool = Field(
        False,
        description="When nothing fits, allow a lower resolution (aspect ratio kept); the result says so.",
    )
    progress: bool = Field(True, description="Show progress bars (loading, denoising).")
    attention: AttentionName = Field(
        "auto",
        description="Attention kernel. 'auto' times the exact kernels available on this GPU once (milliseconds) "
        "and uses the fastest; 'native' is PyTorch's own choice; 'flash', 'cudnn', 'efficient', 'math' force one "
        "of PyTorch's kernels; 'flash_attn', 'flash_attn_3', 'sage' need those packages ('sage' is lossy).",
    )
    compile: CompileMode = Field(
        "auto",
        description="torch.compile the parts of the pipeline that stay on one GPU (the transformer's repeated "
        "blocks, the text encoder, the VAE decoder). 'auto' compiles each part once the work seen (or queued in "
        "one call) makes it a net win including compile time; 'on' compiles the blocks at once and the others "
        "as 'auto' does (they save tens of milliseconds per image for a compile of tens of seconds); 'all' "
        "compiles every part at once; 'off' never.",
    )
    calibrate: bool = Field(
        True,
        description="Measure each GPU's pinned host-to-device bandwidth and matmul rates the first time it is used "
        "(about a second; kept per GPU model, driver and PyTorch version in <cache_dir>/device-speeds.json, or "
        "~/.cache/zimage-turbo/) and plan with them. False: plan with the H200's figures.",
    )
    quantization: QuantizationSetting = Field(
        "none",
        description="Quantize the transformer's large linear layers with torchao (changes the image a little). "
        "'none' never; 'fp8' (Ada/Hopper and newer) or 'int8' (weight-only) always; 'auto' only when no "
        "lossless placement keeps the transformer on the GPU (small cards), with the kind suited to the GPU.",
    )
    converted_copy: ConvertedCopy = Field(
        "auto",
        description="Keep a copy of the weights in the dtype they run in, under <cache_dir>/converted (or "
        "~/.cache/zimage-turbo/converted), for faster loads. 'auto' loads from a sound copy, and after a load "
        "from a source that stores weights in another dtype (the published transformer is float32) writes one "
        "in the background when the disk has room; 'off' never reads or writes one.",
    )

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(type(self).model_fields))
        if unknown:
            known = ", ".join(type(self).model_fields)
            raise InvalidSettingsError(f"Unknown setting(s) {', '.join(unknown)}; known settings: {known}.")
        try:
            try:
                super().__init__(**values)
            except (UnicodeDecodeError, OSError) as exc:
                # The working folder's .env may belong to another program: unreadable or not UTF-8, it is
                # not ours to refuse. The environment and the arguments still apply.
                warnings.warn(f"ignoring the .env file in the working folder: {exc}", RuntimeWarning, stacklevel=2)
                super().__init__(_env_file=None, **values)
        except ValidationError as exc:
            raise InvalidSettingsError(_describe_validation_error(exc)) from None

    @field_validator("model", "revision", "controlnet")
    @classmethod
    def _text_not_blank(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must not be blank")
        if "\x00" in value:
            raise ValueError("must not contain a NUL character")
        return value.strip()

    @field_validator("controlnet", mode="before")
    @classmethod
    def _controlnet_path(cls, value: Any) -> Any:
        # a folder or file given as a Path, as the model may be
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_by_name(cls, value: Any) -> Any:
        # torch.bfloat16 and friends, as diffusers users write them, become their names
        return dtype_name(value)

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _cache_dir_not_blank(cls, value: Any) -> Any:
        # An empty ZIMAGE_CACHE_DIR= line would otherwise mean the current directory.
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be blank; unset it to use the hubs' own cache folders")
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain a NUL character")
        return value

    @field_validator("cache_dir")
    @classmethod
    def _expand_cache_dir(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    def replace(self, **changes: Any) -> ZImageSettings:
        """Return a copy with some fields changed, validated like a new object.

        Environment variables do not leak into the copy: every field comes from this object or ``changes``.
        """
        return type(self)(**{**self.model_dump(), **changes})


def library_cache_dir(cache_root: Path | None) -> Path:
    """Where the library keeps what it measured and compiled: ``cache_root`` (the ``cache_dir`` setting) when
    given, else ``$XDG_CACHE_HOME/zimage-turbo`` (``~/.cache/zimage-turbo`` by default)."""
    if cache_root is not None:
        return cache_root
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zimage-turbo"


DTYPE_NAMES: tuple[str, ...] = tuple(name for name in get_args(DtypeName) if name != "auto")


def dtype_name(value: Any) -> Any:
    """``value`` with a ``torch.dtype`` replaced by its name (``torch.bfloat16`` -> ``"bfloat16"``); anything
    else is returned unchanged, for the field's own validation. A dtype the model cannot run in raises
    ``ValueError``."""
    import torch

    if not isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"the model runs in {', '.join(DTYPE_NAMES)}, not {value}")
    return name


def model_name(model: object) -> str:
    """The ``model`` argument (a repo id or a folder, ``str`` or ``os.PathLike``) as the ``model`` setting's text."""
    try:
        name = os.fspath(model)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidSettingsError(
            f"model must be a repo id or a folder (str or os.PathLike), got {type(model).__name__}"
        ) from None
    if not isinstance(name, str):
        raise InvalidSettingsError(f"model must be text, got {type(name).__name__}")
    return name


def _describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        env_name = ENV_PREFIX + field.upper()
        lines.append(f"{field} (env {env_name}): {error['msg']}; got {error.get('input')!r}")
    return "Invalid zimage-turbo settings:\n  " + "\n  ".join(lines)


def settings_and_options(
    options: dict[str, Any], passed_on: frozenset[str]
) -> tuple[ZImageSettings | None, dict[str, Any]]:
    """Split diffusers-style keyword options into settings and the keywords in ``passed_on`` (a ``settings``
    among them is the base the settings fields apply to). An unknown key is refused listing the known ones."""
    fields = set(ZImageSettings.model_fields) - {"model"}
    unknown = sorted(set(options) - passed_on - fields)
    if unknown:
        known = ", ".join(sorted(passed_on | fields))
        raise InvalidSettingsError(f"Unknown option(s) {', '.join(unknown)}; known options: {known}.")
    rest = dict(options)
    settings = rest.pop("settings", None)
    changes = {key: rest.pop(key) for key in list(rest) if key not in passed_on}
    if changes:
        if settings is not None and not isinstance(settings, ZImageSettings):
            raise InvalidSettingsError(f"settings must be a ZImageSettings, got {type(settings).__name__}")
        settings = settings.replace(**changes) if settings is not None else ZImageSettings(**changes)
    return settings, rest
