"""Ways of placing the model on the hardware. See :class:`LoadStrategy`.

Users pass a name (``strategy="full_gpu"``) or an instance (``strategy=FullGPU(gpu=1)``).
"""

from __future__ import annotations

from ..errors import UnknownStrategyError
from ..hardware import Hardware
from ..settings import STRATEGY_NAMES
from .base import LoadStrategy
from .resident import CPUOnly, FullGPU

__all__ = ["STRATEGIES", "CPUOnly", "FullGPU", "LoadStrategy", "choose_default", "strategy_from"]

# name -> class, for every strategy a user may name. "auto" is not a strategy: the Generator resolves it.
STRATEGIES: dict[str, type[LoadStrategy]] = {cls.name: cls for cls in (FullGPU, CPUOnly)}
assert set(STRATEGIES) | {"auto"} == set(STRATEGY_NAMES), "settings.StrategyName and STRATEGIES disagree"


def strategy_from(value: object) -> LoadStrategy | None:
    """A strategy instance from a name or an instance; None for ``"auto"``.

    Raises :class:`~zimage_turbo.errors.UnknownStrategyError` for anything else, listing the valid names.
    """
    if isinstance(value, LoadStrategy):
        return value
    if isinstance(value, str):
        if value == "auto":
            return None
        if value in STRATEGIES:
            return STRATEGIES[value]()
        raise UnknownStrategyError(f"unknown strategy {value!r}; choose one of: {', '.join(STRATEGY_NAMES)}")
    raise UnknownStrategyError(
        f"strategy must be a name ({', '.join(STRATEGY_NAMES)}) or a LoadStrategy instance, got {type(value).__name__}"
    )


def choose_default(hardware: Hardware) -> LoadStrategy:
    """The strategy ``"auto"`` stands for.

    For now: every component resident on the GPU when there is one, the CPU otherwise. The planner
    (which compares memory estimates with free memory and ranks the candidates) replaces this.
    """
    return FullGPU() if hardware.accelerator in ("cuda", "mps") else CPUOnly()
