"""The process-wide state that building a model changes, guarded so that Generators in threads stay independent.

Building a module with empty weights changes things every thread shares: accelerate's ``init_empty_weights``
replaces ``torch.nn.Module.register_parameter`` for the whole process, and torch's default dtype is one value
per process (transformers sets it too while it builds a model). Two loads at once each restored what the other
had installed, which left every later module of the program on the meta device; and a generation running
meanwhile computed its sigma schedule in bfloat16 (diffusers' ``get_default_z_image_sigmas`` uses the default
dtype), a different image from the same seed.

So changes are :func:`exclusive` (one at a time, after the generations under way have finished, with the state
checked and restored on the way out, even after an exception), and the work that reads the state runs
:func:`shared` (any number at once, none while a change is under way). Changes are short: building the empty
modules, not reading their weights.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["default_dtype", "exclusive", "shared"]

logger = logging.getLogger(__name__)


class _SharedExclusiveLock:
    """Many holders of the shared side, or one of the exclusive side; a waiting exclusive holder goes first
    (generations arrive continuously under a pool and would otherwise starve a load).

    Both sides are reentrant per thread, and a thread that holds the shared side may take the exclusive side
    (a step callback that loads another Generator): it then waits only for the other threads' shared holds.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._shared: dict[int, int] = {}  # thread -> depth
        self._owner: int | None = None
        self._depth = 0
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._changed:
            if self._owner != me and me not in self._shared:
                while self._owner is not None or self._waiting:
                    self._changed.wait()
            self._shared[me] = self._shared.get(me, 0) + 1
        try:
            yield
        finally:
            with self._changed:
                self._shared[me] -= 1
                if not self._shared[me]:
                    del self._shared[me]
                self._changed.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Yields whether this is the outermost exclusive hold of this thread."""
        me = threading.get_ident()
        with self._changed:
            if self._owner == me:
                self._depth += 1
            else:
                self._waiting += 1
                try:
                    while self._owner is not None or any(thread != me for thread in self._shared):
                        self._changed.wait()
                finally:
                    self._waiting -= 1
                self._owner, self._depth = me, 1
            outermost = self._depth == 1
        try:
            yield outermost
        finally:
            with self._changed:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                self._changed.notify_all()


_LOCK = _SharedExclusiveLock()


def _snapshot() -> dict[str, Any]:
    # compared by identity (the functions) or equality (dtype, device)
    return {
        "torch.nn.Module.register_parameter": torch.nn.Module.register_parameter,
        "torch.nn.Module.register_buffer": torch.nn.Module.register_buffer,
        "default dtype": torch.get_default_dtype(),
        "default device": torch.get_default_device(),
    }


def _restore(before: dict[str, Any]) -> None:
    after = _snapshot()
    changed = [name for name, value in before.items() if after[name] is not value and after[name] != value]
    if not changed:
        return
    # A library that did not clean up after itself (or an exception between its patch and its restore):
    # put back what the program had, so that its own modules keep real weights.
    logger.warning("loading left process-wide state changed, restored: %s", ", ".join(changed))
    torch.nn.Module.register_parameter = before["torch.nn.Module.register_parameter"]  # type: ignore[method-assign]
    torch.nn.Module.register_buffer = before["torch.nn.Module.register_buffer"]  # type: ignore[method-assign]
    torch.set_default_dtype(before["default dtype"])
    torch.set_default_device(before["default device"])


@contextmanager
def exclusive() -> Iterator[None]:
    """Change process-wide state inside: no other thread's :func:`exclusive` or :func:`shared` block runs
    meanwhile, and the state is as it was on the way out."""
    with _LOCK.exclusive() as outermost:
        before = _snapshot() if outermost else None
        try:
            yield
        finally:
            if before is not None:
                _restore(before)


@contextmanager
def shared() -> Iterator[None]:
    """Work that reads process-wide state (a generation): it runs beside other shared work, never during a
    change."""
    with _LOCK.shared():
        yield


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Floating tensors created inside (buffers that constructors compute) get ``dtype``, as when the
    libraries load a model in that dtype. Exclusive: the default dtype is one value for the whole process."""
    with exclusive():
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)
