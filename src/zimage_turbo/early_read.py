"""Reading the weights while the model libraries are being imported.

A load imports diffusers and transformers (seconds: diffusers imports ``torch._dynamo``) before it can build
the modules, and only then read the weights into them. The values do not need the modules: where each
component goes and the dtype each tensor is read in are known from the placement and the files' headers. So
the components headed for a GPU or for plain host memory are read on a background thread from the start of
the load, and each module takes its values once built (:func:`~zimage_turbo.weights.fill_module`'s
``ready``). The reads release the GIL (positional reads, copies), so they run beside the imports. Components
headed for host homes (offloading placements) are read as before, when filled: their pinned buffers are
reserved as each module is filled.

If a read fails (a truncated file, the GPU out of memory), the error is raised where the component is taken,
as it would have been when read there, and nothing more is read ahead; :meth:`EarlyReads.close` waits for the
thread and drops anything not taken, so that a failed load leaves no memory behind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import torch

from .weights import EntryValues, TensorEntry, read_entries

__all__ = ["EarlyReads", "reads_early"]

logger = logging.getLogger(__name__)


def reads_early(target: str | torch.device) -> torch.device | None:
    """The device a component headed for ``target`` is read into ahead of its module, or None when it is not
    (host homes, or a device other than the CPU and CUDA GPUs)."""
    if isinstance(target, str) and target == "homes":
        return None
    device = torch.device(target)
    return device if device.type in ("cpu", "cuda") else None


class EarlyReads:
    """Components' weights read one after another on a background thread, started at once.

    Args:
        jobs: (component name, its tensor entries, the device to read them into), in the order they are needed.
        dtype: the run dtype floating tensors are cast to.
    """

    def __init__(self, jobs: Sequence[tuple[str, Sequence[TensorEntry], torch.device]], dtype: torch.dtype) -> None:
        self._jobs = list(jobs)
        self._dtype = dtype
        self._values: dict[str, EntryValues] = {}
        self._errors: dict[str, BaseException] = {}
        self._finished = {name: threading.Event() for name, _, _ in self._jobs}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._jobs:
            self._thread = threading.Thread(target=self._read_all, name="zimage-turbo-early-read", daemon=True)
            self._thread.start()

    def _read_all(self) -> None:
        for name, entries, device in self._jobs:
            try:
                if not self._stop.is_set():
                    started = time.perf_counter()
                    self._values[name] = read_entries(entries, self._dtype, device)
                    logger.debug("%s read ahead into %s in %.2f s", name, device, time.perf_counter() - started)
            except BaseException as exc:  # raised on the loading thread, where the component is taken
                self._errors[name] = exc
                self._stop.set()  # the rest is read when filled, if the load goes on
            finally:
                self._finished[name].set()

    def take(self, name: str) -> EntryValues | None:
        """The values read ahead for component ``name`` (waiting for them), or None where it was not read ahead;
        raises what reading it raised."""
        finished = self._finished.get(name)
        if finished is None:
            return None
        finished.wait()
        error = self._errors.pop(name, None)
        if error is not None:
            raise error
        return self._values.pop(name, None)

    def close(self) -> None:
        """Read nothing more, wait for the thread, and drop the values not taken."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._values.clear()
        self._errors.clear()
