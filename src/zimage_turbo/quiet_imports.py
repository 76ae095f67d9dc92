"""Importing the model libraries without the messages their first import logs about parts we do not use.

When torchao is installed (the ``quant`` extra), the first import of a diffusers pipeline or model class
imports torchao too, and every process printed, whether it quantized anything or not:

- torchao: ``Failed to load .../torchao/_C_*.so`` for each CUDA kernel library that this machine cannot
  load (every one on a machine without CUDA);
- torch (``torch.utils._pytree``): two deprecation lines, as torchao registers two Enum classes;
- diffusers (its torchao quantizer): ``Unable to import `torchao` Tensor objects``, about loading checkpoints
  serialized with torchao, which we never load.

:func:`quiet_imports` raises those three loggers to ERROR only while our own imports run, then puts them back:
the program's own logging, and the same messages caused by its own imports, are left alone. Errors still show.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["QUIETED_LOGGERS", "quiet_imports"]

QUIETED_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "diffusers.quantizers.torchao.torchao_quantizer",
)

_lock = threading.Lock()
_depth = 0
_saved: dict[str, int] = {}


@contextmanager
def quiet_imports() -> Iterator[None]:
    """Within the block, the loggers of :data:`QUIETED_LOGGERS` show errors only. Nested and concurrent blocks
    share one window: the levels are put back when the last of them ends."""
    global _depth
    with _lock:
        if _depth == 0:
            for name in QUIETED_LOGGERS:
                logger = logging.getLogger(name)
                _saved[name] = logger.level
                logger.setLevel(max(logger.level, logging.ERROR))
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for name, level in _saved.items():
                    logging.getLogger(name).setLevel(level)
                _saved.clear()
