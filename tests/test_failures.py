"""The one classifier of foreign errors: real exception objects, as PyTorch and CUDA raise them, and what each
means to the retry ladder."""

from __future__ import annotations

import pytest
import torch

from zimage_turbo.errors import DeviceFailedError, NotEnoughMemoryError
from zimage_turbo.failures import classify, is_device_failure, is_out_of_memory

ASYNC_NOTE = (
    "\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
    "might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1"
)


def _raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    """``outer`` as ``raise outer from cause`` leaves it (with a traceback, a cause and a context)."""
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer from inner
    except BaseException as exc:
        return exc


def _host_allocation_failure() -> BaseException:
    try:
        torch.empty(1 << 62, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    raise AssertionError("a 4 EiB tensor was allocated")


MEMORY = [
    torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.70 GiB of which "
        "1.06 GiB is free. Of the allocated memory 13.9 GiB is allocated by PyTorch"
    ),
    torch.OutOfMemoryError(""),  # the type alone says it
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"),  # older PyTorch: a plain RuntimeError
    RuntimeError("HIP out of memory. Tried to allocate 20.00 MiB"),
    RuntimeError("CUDA error: out of memory" + ASYNC_NOTE),  # cudaErrorMemoryAllocation from a kernel launch
    torch.AcceleratorError("CUDA error: out of memory" + ASYNC_NOTE),  # the same from PyTorch >= 2.8
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    torch.AcceleratorError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasLtCreate(&handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
]

DEVICE = [
    RuntimeError("CUDA error: an illegal memory access was encountered" + ASYNC_NOTE),
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered" + ASYNC_NOTE),
    RuntimeError("CUDA error: device-side assert triggered" + ASYNC_NOTE),
    torch.AcceleratorError("CUDA error: device-side assert triggered"),
    RuntimeError("CUDA error: unspecified launch failure"),
    RuntimeError("CUDA error: misaligned address"),
    RuntimeError("CUDA error: an illegal instruction was encountered"),
    RuntimeError("CUDA error: uncorrectable ECC error encountered" + ASYNC_NOTE),
    torch.AcceleratorError("CUDA error: uncorrectable ECC error encountered"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(handle, opa, opb, ...)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
    RuntimeError("HIP error: an illegal memory access was encountered"),
    # a message naming both: the sticky error decides (retrying on a poisoned context cannot help)
    RuntimeError("CUDA error: an illegal memory access was encountered while reporting out of memory"),
    # a RuntimeError subclass that is not a CUDA error type still reports a CUDA error by its text
    DeviceFailedError("this Generator met a CUDA error that was not out-of-memory (RuntimeError: ...)"),
]

OTHER = [
    RuntimeError("Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
    RuntimeError("decoding failed:\nCUDA out of memory. Tried to allocate 20.00 MiB"),  # only the first line counts
    _host_allocation_failure(),  # host memory: not the GPU ladder's business
    MemoryError(),
    NotImplementedError("Could not run 'aten::empty.memory_format' with arguments from the 'CUDA' backend"),
    NotImplementedError("CUDA out of memory"),  # no CUDA error type: a message quoting one is not one
    ValueError("CUDA error: not really"),
    TypeError("out of memory"),
    NotEnoughMemoryError("every way of running the request ran out of memory"),
    # causes are not followed: an error raised from an out-of-memory error is what it says it is
    _raised_from(ValueError("the decode gave up"), torch.OutOfMemoryError("CUDA out of memory.")),
    _raised_from(RuntimeError("decode failed"), RuntimeError("CUDA error: an illegal memory access was encountered")),
    KeyboardInterrupt(),
    SystemExit(1),
    GeneratorExit(),
]

TABLE = (
    [(error, "out_of_memory") for error in MEMORY]
    + [(error, "device_failure") for error in DEVICE]
    + [(error, "other") for error in OTHER]
)


IDS = [f"{kind}-{type(error).__name__}-{index}" for index, (error, kind) in enumerate(TABLE)]


@pytest.mark.parametrize(("error", "kind"), TABLE, ids=IDS)
def test_each_error_has_its_kind(error: BaseException, kind: str) -> None:
    assert classify(error) == kind
    assert is_out_of_memory(error) is (kind == "out_of_memory")
    assert is_device_failure(error) is (kind == "device_failure")


def test_the_message_is_read_not_changed() -> None:
    error = RuntimeError("CUDA error: out of memory")
    assert classify(error) == "out_of_memory" and str(error) == "CUDA error: out of memory"
    assert error.__cause__ is None and error.__traceback__ is None
