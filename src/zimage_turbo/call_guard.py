"""One Generator's calls, one at a time: its lock, whether it was closed, and the CUDA error that made it
unusable.

A call from inside the Generator's own callback (the same thread, holding the lock) is refused rather than
left waiting for itself. A CUDA error other than out-of-memory (an illegal access, a device-side assert)
leaves the process's CUDA context unusable until the process ends: once one is seen, every later call is
refused with :class:`~zimage_turbo.errors.DeviceFailedError` instead of failing somewhere deeper.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import DeviceFailedError, GeneratorClosedError, InvalidRequestError, first_line
from .failures import is_device_failure

__all__ = ["CallGuard"]


class CallGuard:
    """The lock around one Generator's calls, its closed flag and its device failure."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._owner: int | None = None  # the thread holding the lock
        self.closed = False
        self.device_failure: str | None = None  # a CUDA error that poisoned the context, once met

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the lock for one call (refused from inside the Generator's own callback)."""
        me = threading.get_ident()
        if self._owner == me:
            raise InvalidRequestError(
                "this Generator was called from inside its own callback, which runs while it generates; the call "
                "would wait for itself. Make the call after generate() returns."
            )
        with self.lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def check_open(self) -> None:
        if self.closed:
            raise GeneratorClosedError("this Generator was closed; create a new one")

    def check_device(self) -> None:
        if self.device_failure is not None:
            raise DeviceFailedError(
                f"this Generator met a CUDA error that was not out-of-memory ({self.device_failure}); such "
                "errors leave the process's CUDA context unusable, so it refuses further work. Restart the process."
            )

    def note(self, exc: BaseException) -> bool:
        """Remember ``exc`` if it is a CUDA error that poisons the context; whether it was one."""
        if not is_device_failure(exc):
            return False
        self.device_failure = f"{type(exc).__name__}: {first_line(exc)}"
        return True

    @contextmanager
    def watching_device(self) -> Iterator[None]:
        """Remember a context-poisoning CUDA error raised inside, then let it propagate unchanged."""
        try:
            yield
        except BaseException as exc:
            self.note(exc)
            raise
