"""The interface every way of placing the model implements.

A strategy decides where each component's weights live and where they run. It never reads weights from
disk: the Generator loads the pipeline once (to :meth:`LoadStrategy.load_device`), then calls
:meth:`~LoadStrategy.apply`; switching strategy later is ``remove()`` on the old one and ``apply()`` on
the new one, on the same in-memory modules. That keeps a fallback after an out-of-memory error to
seconds instead of a 20 GB reload.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..hardware import Hardware

__all__ = ["LoadStrategy"]


class LoadStrategy(ABC):
    """How the pipeline's components are placed on devices.

    Subclasses set ``name`` (what users pass as ``strategy=``) and implement the three methods.
    """

    name: ClassVar[str]

    @abstractmethod
    def load_device(self, hardware: Hardware) -> torch.device:
        """Where weights should land when the pipeline is first loaded (straight there, no detour)."""

    @abstractmethod
    def apply(self, pipe: Any, hardware: Hardware) -> None:
        """Place (or hook) the pipeline's modules for this strategy."""

    @abstractmethod
    def remove(self, pipe: Any) -> None:
        """Undo :meth:`apply`: move weights back to host memory and drop any hooks."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
