"""The LoRAs a Generator is asked to use: each read from its source, named and scaled; the list changed one
call at a time, every change checked before anything is applied (see :mod:`zimage_turbo.adapters` for how
they get into the weights)."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace

from .errors import LoraError
from .lora_files import LoraFile, read_lora
from .lora_sources import resolve_lora
from .settings import ZImageSettings

__all__ = ["Lora", "added", "check_scale", "read_lora_source", "removed", "rescaled"]


@dataclass(frozen=True)
class Lora:
    """A loaded LoRA: the name it goes by, where it came from (a repo id or a file name), its factors and the
    scale it is fused at."""

    name: str
    source: str
    file: LoraFile
    scale: float


def check_scale(scale: object, what: str = "scale") -> float:
    """``scale`` as a float; a bool, a non-number or a non-finite value raises
    :class:`~zimage_turbo.errors.LoraError`."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise LoraError(f"a LoRA's {what} must be a finite number, got {scale!r}")
    return float(scale)


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise LoraError(f"a LoRA's name must be a non-empty string without surrounding spaces, got {name!r}")
    return name


def read_lora_source(
    source: str | os.PathLike[str],
    *,
    scale: float,
    name: str | None,
    weight_name: str | None,
    settings: ZImageSettings,
) -> Lora:
    """Find, read and check the LoRA ``source`` names (the arguments of :meth:`Generator.load_lora`).
    Nothing of a model is touched: the fit to the model is checked when it is applied."""
    checked = check_scale(scale)
    if name is not None:
        check_name(name)
    found = resolve_lora(source, weight_name=weight_name, settings=settings)
    file = read_lora(found.path)
    default = found.path.name.removesuffix(found.path.suffix)
    return Lora(name=name if name is not None else default, source=found.label, file=file, scale=checked)


def added(loras: tuple[Lora, ...], lora: Lora) -> tuple[Lora, ...]:
    if any(known.name == lora.name for known in loras):
        raise LoraError(
            f"a LoRA named {lora.name!r} is loaded already: unload it first, or load this one with another name=",
            path=lora.file.path,
        )
    return (*loras, lora)


def rescaled(loras: tuple[Lora, ...], name: str, scale: float) -> tuple[Lora, ...]:
    _known(loras, name)
    return tuple(replace(lora, scale=scale) if lora.name == name else lora for lora in loras)


def removed(loras: tuple[Lora, ...], name: str | None) -> tuple[Lora, ...]:
    """Without ``name`` (None: without any)."""
    if name is None:
        return ()
    _known(loras, name)
    return tuple(lora for lora in loras if lora.name != name)


def _known(loras: tuple[Lora, ...], name: object) -> None:
    if not any(lora.name == name for lora in loras):
        loaded = ", ".join(repr(lora.name) for lora in loras) or "none"
        raise LoraError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
