"""What a foreign error means to us: the one place that recognises errors of PyTorch and CUDA.

PyTorch reports most GPU failures as a ``RuntimeError`` whose message says what went wrong, so telling them
apart means reading the text. That is done here and nowhere else. :func:`classify` sorts any exception into
one of three kinds:

* ``"out_of_memory"``: CUDA (or cuBLAS/cuDNN) could not allocate. The retry ladder handles these: free
  memory, try a placement that needs less.
* ``"device_failure"``: any other CUDA error (an illegal memory access, a device-side assert, a crashed
  kernel, an ECC error). Such errors are sticky: every later CUDA call in the process fails too, so nothing
  may be retried and the Generator that met one refuses further work
  (:class:`~zimage_turbo.errors.DeviceFailedError`).
* ``"other"``: everything else, including our own errors and the user's (they propagate unchanged).

Causes (``__cause__``, ``__context__``) are not followed: an error raised *from* an out-of-memory error is
what it says it is.
"""

from __future__ import annotations

from typing import Literal

import torch

from .errors import first_line

__all__ = ["Failure", "classify", "is_device_failure", "is_out_of_memory"]

Failure = Literal["out_of_memory", "device_failure", "other"]

# What an allocation failure looks like on the first line of a RuntimeError's message.
_ALLOCATION_FAILURES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "out of memory")
# What CUDA's sticky errors look like in PyTorch's messages: after one of these every later CUDA call in the
# process fails too (an illegal address, a device-side assert, a kernel that crashed).
_DEVICE_FAILURES = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "illegal address",
    "unspecified launch failure",
    "misaligned address",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_EXECUTION_FAILED",
    "HIP error",
)
# The types that report CUDA's allocation failures by text: torch >= 2.8 raises CUDA errors as
# torch.AcceleratorError, a RuntimeError subclass. Other subclasses (NotImplementedError, our own
# DeviceFailedError) never mean that memory ran out, whatever their message quotes.
_CUDA_ERROR_TYPES: tuple[type[BaseException], ...] = (RuntimeError, getattr(torch, "AcceleratorError", RuntimeError))


def classify(exc: BaseException) -> Failure:
    """What ``exc`` means for the retry ladder: ``"out_of_memory"``, ``"device_failure"`` or ``"other"``."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "out_of_memory"
    if not isinstance(exc, RuntimeError):
        return "other"
    first = first_line(exc)
    if (
        type(exc) in _CUDA_ERROR_TYPES
        and any(marker in first for marker in _ALLOCATION_FAILURES)
        and "illegal" not in first
    ):
        return "out_of_memory"
    if any(marker in first for marker in _DEVICE_FAILURES):
        return "device_failure"
    return "other"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the errors the ladder handles: CUDA running out of memory (also inside cuBLAS/cuDNN, which
    report it as a RuntimeError). Other CUDA errors (an illegal access, a device-side assert) are not: they
    leave the CUDA context unusable, and retrying would only hide them."""
    return classify(exc) == "out_of_memory"


def is_device_failure(exc: BaseException) -> bool:
    """True for CUDA errors other than running out of memory: they poison the process's CUDA context, so the
    Generator that met one must not touch the GPU again (see :class:`~zimage_turbo.errors.DeviceFailedError`)."""
    return classify(exc) == "device_failure"
