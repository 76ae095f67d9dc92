"""Importing the model libraries without the messages their first import logs about parts we do not use, and
without asking twice what the environment has installed.

When torchao is installed (the ``quant`` extra), the first import of a diffusers pipeline or model class
imports torchao too, and every process printed, whether it quantized anything or not:

- torchao: ``Failed to load .../torchao/_C_*.so`` for each CUDA kernel library that this machine cannot
  load (every one on a machine without CUDA);
- torch (``torch.utils._pytree``): two deprecation lines, as torchao registers two Enum classes;
- diffusers (its torchao quantizer): ``Unable to import `torchao` Tensor objects``, about loading checkpoints
  serialized with torchao, which we never load.

:func:`quiet_imports` raises those three loggers to ERROR only while our own imports run, then puts them back:
the program's own logging, and the same messages caused by its own imports, are left alone. Errors still show.

diffusers and transformers each call ``importlib.metadata.packages_distributions()`` once while they are
imported: a scan of every installed distribution's file list, 0.7 s on a small environment and 1.6 s on the
H200 machine's (2026-11-29 profile of a cold start). Within the same window the first answer is kept and handed
(as a copy) to the second caller: nothing is installed in between, and a process start pays the scan once.
A window opened with ``package_map`` (the Generator's load) takes that answer from the map kept between processes
(:mod:`~zimage_turbo.package_map`) while the environment is unchanged, so a process start need not scan at all.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .package_map import kept_packages_distributions

__all__ = ["QUIETED_LOGGERS", "quiet_imports"]

QUIETED_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "diffusers.quantizers.torchao.torchao_quantizer",
)

_lock = threading.Lock()
_depth = 0
_saved: dict[str, int] = {}
_scan: Callable[[], Mapping[str, list[str]]] | None = None  # the real packages_distributions, while replaced
_scanned: list[Mapping[str, list[str]]] = []  # its first answer in this window
_kept_in: Path | None = None  # where this window keeps the answer between processes (None: nowhere)


@contextmanager
def quiet_imports(package_map: Path | None = None) -> Iterator[None]:
    """Within the block, the loggers of :data:`QUIETED_LOGGERS` show errors only. Nested and concurrent blocks
    share one window: the levels are put back when the last of them ends. ``package_map``: the file that keeps
    the installed distributions' package map between processes (used by the block that opens the window)."""
    global _depth, _kept_in
    with _lock:
        if _depth == 0:
            _kept_in = package_map
            for name in QUIETED_LOGGERS:
                logger = logging.getLogger(name)
                _saved[name] = logger.level
                logger.setLevel(max(logger.level, logging.ERROR))
            _share_package_map()
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
                _unshare_package_map()


def _share_package_map() -> None:
    global _scan
    _scan = importlib.metadata.packages_distributions
    importlib.metadata.packages_distributions = _packages_distributions_once


def _unshare_package_map() -> None:
    global _scan, _kept_in
    if importlib.metadata.packages_distributions is _packages_distributions_once and _scan is not None:
        importlib.metadata.packages_distributions = _scan  # (left alone if someone replaced it meanwhile)
    _scan = None
    _kept_in = None
    _scanned.clear()


def _packages_distributions_once() -> Mapping[str, list[str]]:
    """``packages_distributions()``, scanned once in a window; a copy for each caller, who may change theirs."""
    with _lock:
        scan = _scan
        if scan is None:  # a reference kept past the window: answer as the function put back does
            scan = importlib.metadata.packages_distributions
            first = None
        else:
            if not _scanned:
                _scanned.append(scan() if _kept_in is None else kept_packages_distributions(_kept_in, scan))
            first = _scanned[0]
    if first is None:
        return scan()
    return {name: list(distributions) for name, distributions in first.items()}
