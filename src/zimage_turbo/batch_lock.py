"""One batch run at a time per output folder: a lock file inside the folder, and a note of who holds it.

Two runs on one folder would both find the same images missing, make them both, and append each line twice;
the manifest's promise (every image listed once) needs a single writer. The lock is an OS file lock
(:mod:`filelock`: ``flock`` on Unix, a Windows file lock on Windows), so the system drops it when its process
dies, even by SIGKILL: a killed run never leaves a folder locked. Beside it the holder writes its pid, host and start
time, so that a refused run can say who is in the way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .errors import BatchLockedError, InvalidRequestError

__all__ = ["HOLDER_NAME", "LOCK_NAME", "lock_folder", "lock_timeout"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".zimage-batch.lock"
HOLDER_NAME = ".zimage-batch.holder.json"


def lock_timeout(wait: bool | float) -> float:
    """``wait`` (False: not at all, True: as long as it takes, a number: that many seconds) as a filelock timeout
    (-1 waits forever). Checked before the folder is touched."""
    if isinstance(wait, bool):
        return -1.0 if wait else 0.0
    if not isinstance(wait, (int, float)) or not math.isfinite(wait) or wait < 0:
        raise InvalidRequestError(f"wait must be True, False or a number of seconds >= 0, got {wait!r}")
    return float(wait)


@contextlib.contextmanager
def lock_folder(folder: Path, *, wait: bool | float = False) -> Iterator[None]:
    """Hold ``folder``'s batch lock (the folder must exist) while the block runs; released on every way out,
    exceptions and KeyboardInterrupt included.

    Raises:
        BatchLockedError: another run holds it (another process, or another lock in this one), and it was not
            released within ``wait``.
    """
    timeout = lock_timeout(wait)
    # A fresh FileLock object each time: filelock makes one object reentrant, so reusing one would let a second
    # run in this process through; separate objects exclude each other, in one process as across processes.
    lock = FileLock(folder / LOCK_NAME)
    try:
        _acquire(lock, folder, timeout)
        _write_holder(folder)
        yield
    finally:
        # (also reached when an interrupt lands between taking the lock and the block)
        if lock.is_locked:
            # The note goes first: once the lock is released, the next holder writes its own.
            (folder / HOLDER_NAME).unlink(missing_ok=True)
            lock.release()


def _acquire(lock: FileLock, folder: Path, timeout: float) -> None:
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if timeout == 0:
            raise _locked(folder) from None
        # Say who is in the way, or a waiting command looks hung.
        logger.warning("%s is in use by another batch run (%s); waiting for it to finish", folder, _holder(folder)[2])
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise _locked(folder) from None


def _write_holder(folder: Path) -> None:
    note = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S%z")}
    temporary = folder / f"{HOLDER_NAME}.{os.getpid()}.tmp"
    try:
        temporary.write_text(json.dumps(note), encoding="utf-8")
        os.replace(temporary, folder / HOLDER_NAME)  # whole or absent for a reader, never half written
    except OSError as exc:  # the note is a courtesy: the lock itself is held
        temporary.unlink(missing_ok=True)
        logger.warning("could not record this process as the holder of %s: %s", folder / LOCK_NAME, exc)


def _holder(folder: Path) -> tuple[int | None, str | None, str]:
    """The holder's pid and host as it noted them (None when unknown), and a phrase naming it."""
    note: Any = None
    with contextlib.suppress(OSError, ValueError):
        note = json.loads((folder / HOLDER_NAME).read_text(encoding="utf-8"))
    if not isinstance(note, dict):
        note = {}
    pid, host, since = note.get("pid"), note.get("host"), note.get("since")
    pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
    host = host if isinstance(host, str) else None
    if pid is None or host is None:
        return None, None, "a process that has not said which"  # it has just taken the lock, or could not note it
    return pid, host, f"pid {pid} on {host}" + (f", since {since}" if isinstance(since, str) else "")


def _locked(folder: Path) -> BatchLockedError:
    pid, host, holder = _holder(folder)
    return BatchLockedError(
        f"{folder} is in use by another batch run ({holder}); wait for it with --wait (wait=True), or use "
        "another output folder",
        folder=str(folder),
        pid=pid,
        host=host,
    )
