"""Asking the operating system to start reading the weight files while the model libraries are imported.

A load first imports diffusers and transformers (seconds: diffusers imports ``torch._dynamo``, which brings
Triton) and only then reads the weights. When the files are not in the page cache (the first start after a
reboot, a model just downloaded), reading them is the longest part of the start: 15 s for the 19 GiB converted
copy on the H200 machine's disk (2026-11-29), after 6-8 s of imports during which the disk was idle.

:func:`start_readahead` tells the kernel that the files will be needed (``posix_fadvise(..., WILLNEED)``, one
file after another, from a background thread since the call may wait for the disk's queue), so that the reads
run during the imports and the load then finds the bytes in memory. It changes no byte that is read, only when
the disk works; where the advice does not exist (Windows, macOS) or the files would not fit in the memory
available (the advice would evict what it read before the load gets there), it does nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

__all__ = ["READAHEAD_MEMORY_SHARE", "start_readahead"]

logger = logging.getLogger(__name__)

# Advise only files that fit in this share of the memory available now: the rest of it is for the process
# itself (pinned host homes, the pipeline's host copies) and for other programs.
READAHEAD_MEMORY_SHARE = 0.5


def start_readahead(paths: Sequence[Path]) -> threading.Thread | None:
    """Start the kernel reading ``paths`` (in that order) into the page cache, from a daemon thread; the
    thread, or None where the advice is not available or the files would not fit in memory."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None or not paths:
        return None
    try:
        total = sum(path.stat().st_size for path in paths)
    except OSError:
        return None  # the load reports missing files itself
    available = psutil.virtual_memory().available
    if total > READAHEAD_MEMORY_SHARE * available:
        shown = (total / 2**30, available / 2**30)
        logger.debug("no readahead: %.1f GiB of weights, %.1f GiB of memory available", *shown)
        return None
    thread = threading.Thread(target=_advise_all, args=(list(paths),), name="zimage-turbo-readahead", daemon=True)
    thread.start()
    return thread


def _advise_all(paths: list[Path]) -> None:
    started = time.perf_counter()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:  # a file system that refuses the advice: nothing lost
            pass
        finally:
            os.close(fd)
    logger.debug("readahead of %d weight files advised in %.2f s", len(paths), time.perf_counter() - started)
