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

:func:`guard_compiled` applies the same map to a compiled call: a failure of the compiler itself costs speed
(the call runs eagerly), never an image, while memory and the device fail as they would eagerly.

Causes (``__cause__``, ``__context__``) are not followed: an error raised *from* an out-of-memory error is
what it says it is. The one exception is an error of PyTorch's compiler (Dynamo, Inductor) that carries the
error it ran into (``inner_exception``): it is classified as that error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Literal

import torch

from .errors import first_line

__all__ = ["Failure", "classify", "guard_compiled", "is_device_failure", "is_out_of_memory"]

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
# How deep compiler errors wrapping compiler errors are unwrapped.
_MAX_WRAPPING = 8


def classify(exc: BaseException) -> Failure:
    """What ``exc`` means for the retry ladder: ``"out_of_memory"``, ``"device_failure"`` or ``"other"``."""
    for _ in range(_MAX_WRAPPING):
        inner = _compiler_inner_error(exc)
        if inner is None:
            break
        exc = inner
    if isinstance(exc, torch.OutOfMemoryError):
        return "out_of_memory"
    if not isinstance(exc, RuntimeError):
        return "other"
    first = first_line(exc)
    if (
        (type(exc) in _CUDA_ERROR_TYPES or _is_compiler_error(exc))
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


def guard_compiled(
    compiled: Callable[..., Any], eager: Callable[..., Any], on_failure: Callable[[BaseException], None]
) -> Callable[..., Any]:
    """``compiled``, but if the compiler fails (Dynamo cannot trace, Inductor cannot generate code), ``on_failure``
    is told and the call runs ``eager``: a compiler problem costs speed, never an image. What the compiler ran
    into is classified like any error: running out of memory while tuning kernels is raised as the
    OutOfMemoryError it is (the retry ladder's business), a CUDA error that poisoned the context propagates
    (running eagerly on that context would only fail again), and errors of the model itself propagate as they
    would eagerly."""
    from torch._dynamo.exc import TorchDynamoException  # imported here: importing Dynamo takes seconds

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except TorchDynamoException as exc:
            kind = classify(exc)
            if kind == "out_of_memory":
                raise torch.OutOfMemoryError(first_line(exc)) from exc
            if kind == "device_failure":
                raise
            on_failure(exc)
            return eager(*args, **kwargs)

    return call


def _is_compiler_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an error of Dynamo or Inductor (``torch._dynamo.exc.TorchDynamoException``). Such an
    error can only exist once Dynamo was imported (which takes seconds), so it is looked up, never imported."""
    dynamo = sys.modules.get("torch._dynamo.exc")
    base = getattr(dynamo, "TorchDynamoException", None)
    return isinstance(base, type) and isinstance(exc, base)


def _compiler_inner_error(exc: BaseException) -> BaseException | None:
    """The error a compiler error says it ran into (Inductor's ``InductorError``, ``BackendCompilerFailed``),
    or None."""
    if not _is_compiler_error(exc):
        return None
    inner = getattr(exc, "inner_exception", None)
    return inner if isinstance(inner, BaseException) else None
