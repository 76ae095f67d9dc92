"""The one classifier of foreign errors: real exception objects, as PyTorch and CUDA raise them, and what each
means to the retry ladder."""

from __future__ import annotations

import subprocess

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError, TorchDynamoException, Unsupported

from zimage_turbo.errors import DeviceFailedError, NotEnoughMemoryError
from zimage_turbo.failures import classify, guard_compiled, is_device_failure, is_out_of_memory

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


def _inductor(inner: Exception) -> BackendCompilerFailed:
    """``inner`` as Dynamo wraps what its backend raised."""
    try:
        return BackendCompilerFailed(_inductor, inner, None)
    except TypeError:  # PyTorch < 2.7: no first_useful_frame
        return BackendCompilerFailed(_inductor, inner)  # type: ignore[call-arg]


try:
    from torch._inductor.exc import InductorError
except ImportError:  # PyTorch < 2.7, where the compiler's own errors reach the caller as BackendCompilerFailed

    class InductorError(BackendCompilerFailed):  # type: ignore[no-redef]
        def __init__(self, inner_exception: Exception, first_useful_frame: object) -> None:
            super().__init__(_inductor, inner_exception)  # type: ignore[call-arg]


# PyTorch >= 2.8 raises CUDA errors as torch.AcceleratorError, a RuntimeError subclass; before, as RuntimeError
AcceleratorError: type[RuntimeError] = getattr(torch, "AcceleratorError", RuntimeError)


def _unsupported() -> Unsupported:
    try:
        torch.compile(lambda x: torch._dynamo.graph_break() or x, backend="eager", fullgraph=True)(torch.ones(1))
    except Unsupported as exc:
        return exc
    raise AssertionError("Dynamo traced a graph break with fullgraph=True")


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
    AcceleratorError("CUDA error: out of memory" + ASYNC_NOTE),  # the same from PyTorch >= 2.8
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    AcceleratorError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasLtCreate(&handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("Triton Error [CUDA]: out of memory"),  # a generated kernel's launch
    # the compiler ran out while tuning kernels: what it ran into decides
    InductorError(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB"), None),
    _inductor(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")),
    _inductor(InductorError(torch.OutOfMemoryError("CUDA out of memory."), None)),  # wrapped twice
    InternalTorchDynamoError("OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"),  # re-wrapped text
]

DEVICE = [
    RuntimeError("CUDA error: an illegal memory access was encountered" + ASYNC_NOTE),
    AcceleratorError("CUDA error: an illegal memory access was encountered" + ASYNC_NOTE),
    RuntimeError("CUDA error: device-side assert triggered" + ASYNC_NOTE),
    AcceleratorError("CUDA error: device-side assert triggered"),
    RuntimeError("CUDA error: unspecified launch failure"),
    RuntimeError("CUDA error: misaligned address"),
    RuntimeError("CUDA error: an illegal instruction was encountered"),
    RuntimeError("CUDA error: uncorrectable ECC error encountered" + ASYNC_NOTE),
    AcceleratorError("CUDA error: uncorrectable ECC error encountered"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(handle, opa, opb, ...)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
    RuntimeError("HIP error: an illegal memory access was encountered"),
    RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
    InductorError(AcceleratorError("CUDA error: an illegal memory access was encountered"), None),
    _inductor(RuntimeError("CUDA error: device-side assert triggered")),
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
    # failures of the compiler itself
    _unsupported(),
    _inductor(AssertionError("cannot generate code for this graph")),
    _inductor(subprocess.CalledProcessError(1, ["cc"], output=b"cc1: out of memory allocating 65536 bytes")),
    _inductor(NotImplementedError("CUDA out of memory")),
    TorchDynamoException("backend raised:\nCUDA out of memory"),  # only the first line counts here too
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


# -- compiled calls ---------------------------------------------------------------------------------------


class Calls:
    """A compiled function that raises ``error``, its eager twin, and what the guard told."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.eager_calls = 0
        self.failures: list[BaseException] = []
        self.call = guard_compiled(self.compiled, self.eager, self.failures.append)

    def compiled(self, x: int) -> int:
        if self.error is not None:
            raise self.error
        return x + 1

    def eager(self, x: int) -> int:
        self.eager_calls += 1
        return x + 1


def test_a_compiled_call_that_works_is_the_compiled_call() -> None:
    calls = Calls(None)
    assert calls.call(1) == 2 and calls.eager_calls == 0 and calls.failures == []


@pytest.mark.parametrize(
    "error",
    [
        _unsupported(),
        _inductor(AssertionError("cannot generate code for this graph")),
        _inductor(subprocess.CalledProcessError(1, ["cc"], output=b"cc1: out of memory allocating 65536 bytes")),
    ],
)
def test_a_compiler_failure_runs_the_call_eagerly(error: BaseException) -> None:
    calls = Calls(error)
    assert calls.call(1) == 2 and calls.eager_calls == 1 and calls.failures == [error]


@pytest.mark.parametrize(
    "error",
    [
        InductorError(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB"), None),
        _inductor(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")),
        InternalTorchDynamoError("OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"),
    ],
)
def test_memory_running_out_in_the_compiler_is_an_out_of_memory_error(error: BaseException) -> None:
    calls = Calls(error)
    with pytest.raises(torch.OutOfMemoryError) as raised:
        calls.call(1)
    assert raised.value.__cause__ is error and classify(raised.value) == "out_of_memory"
    assert calls.eager_calls == 0 and calls.failures == []


def test_a_device_failure_in_the_compiler_propagates_unchanged() -> None:
    error = InductorError(AcceleratorError("CUDA error: an illegal memory access was encountered"), None)
    calls = Calls(error)
    with pytest.raises(InductorError) as raised:
        calls.call(1)
    assert raised.value is error and classify(raised.value) == "device_failure"
    assert calls.eager_calls == 0 and calls.failures == []


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),  # the compiled graph ran
        AcceleratorError("CUDA error: an illegal memory access was encountered"),
        ValueError("an error of the model itself"),
        KeyboardInterrupt(),
    ],
)
def test_errors_of_the_compiled_code_propagate_as_they_would_eagerly(error: BaseException) -> None:
    calls = Calls(error)
    with pytest.raises(type(error)) as raised:
        calls.call(1)
    assert raised.value is error and calls.eager_calls == 0 and calls.failures == []
