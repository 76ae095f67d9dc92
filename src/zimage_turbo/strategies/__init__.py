"""Ways of placing the model on the hardware. See :class:`LoadStrategy`.

Users pass a name (``strategy="hybrid"``) or an instance (``strategy=FullGPU(device="cuda:1")``).

| name | class | what |
|---|---|---|
| ``full_gpu`` | :class:`FullGPU` | every component resident on one GPU |
| ``multi_gpu`` | :class:`MultiGPUDispatch` | components or transformer blocks spread over several GPUs |
| ``multi_gpu_hybrid`` | :class:`MultiGPUHybrid` | transformer blocks spread over several GPUs, text encoder streamed |
| ``hybrid`` | :class:`Hybrid` | transformer + VAE resident, text encoder streamed |
| ``partial`` | :class:`PartialOffload` | VAE and as many blocks as fit resident, the other blocks streamed |
| ``model_offload`` | :class:`ModelCPUOffload` | one whole component on the GPU at a time |
| ``streamed`` | :class:`StreamedOffload` | text encoder and transformer streamed block by block |
| ``sequential_offload`` | :class:`SequentialOffload` | streamed layer by layer: the least GPU memory |
| ``cpu`` | :class:`CPUOnly` | everything on the CPU |
"""

from __future__ import annotations

from ..errors import UnknownStrategyError
from ..settings import STRATEGY_NAMES
from .base import LoadStrategy, MemoryEstimate
from .multi_gpu import MultiGPUDispatch, MultiGPUHybrid
from .offload import ModelCPUOffload
from .partial import PartialOffload
from .resident import CPUOnly, FullGPU
from .streaming import Hybrid, SequentialOffload, StreamedOffload

__all__ = [
    "STRATEGIES",
    "CPUOnly",
    "FullGPU",
    "Hybrid",
    "LoadStrategy",
    "MemoryEstimate",
    "ModelCPUOffload",
    "MultiGPUDispatch",
    "MultiGPUHybrid",
    "PartialOffload",
    "SequentialOffload",
    "StreamedOffload",
    "strategy_from",
]

# name -> class, for every strategy a user may name. "auto" is not a strategy: the planner resolves it.
STRATEGIES: dict[str, type[LoadStrategy]] = {
    cls.name: cls
    for cls in (
        FullGPU,
        MultiGPUDispatch,
        MultiGPUHybrid,
        Hybrid,
        PartialOffload,
        ModelCPUOffload,
        StreamedOffload,
        SequentialOffload,
        CPUOnly,
    )
}
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
