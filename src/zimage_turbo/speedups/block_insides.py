"""Compiling the insides of streamed blocks: their attention, feed-forward and norms, beneath the hooks that move
their weights.

A block that ``partial`` streams carries diffusers' offloading hook on itself, so it cannot be compiled whole (the
graph would contain the weight moves). Its children carry no hook: once the hook has brought the weights, they
compute like a resident block's. Compiled, a streamed block computes in about the time of a resident compiled one
instead of the eager 4.3 ms (H200, 1024x1024): only the block's own gating between its children stays eager.

Each child class's ``forward`` is compiled once (its own code object, so the compiled classes do not share one
cache of Dynamo's, as modules compiled through ``nn.Module._call_impl`` do) and every child of that class calls it
with itself as an argument: Dynamo lifts the weights as inputs, so the same graph serves every block and whatever
memory the hook copied the weights into. The child gets the compiled call as an instance attribute ``forward``,
which shadows its class's; removing that attribute is the way back to eager.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..failures import guard_compiled

__all__ = ["block_insides", "compile_insides", "insides_compiled", "uncompile_insides"]

# Set on a child whose ``forward`` this module replaced (so that a ``forward`` set by anyone else is left alone).
_MARK = "_zimage_turbo_compiled_inside"
# One compiled forward per (class, compile options): the options change only in tests (the "eager" backend).
_COMPILED: dict[tuple[type, str], Callable[..., Any]] = {}


def block_insides(
    blocks: Iterable[torch.nn.Module], hooked: Callable[[torch.nn.Module], bool]
) -> list[torch.nn.Module]:
    """The children of ``blocks`` worth compiling inside the blocks' hooks: all but lone linear layers (one matmul,
    nothing to fuse) and anything ``hooked`` itself. Blocks holding flattened quantized layers are left out: their
    layers have a compiled path of their own (:func:`~zimage_turbo.flat_quantized.compile_flat_linears`)."""
    from ..flat_quantized import FlatQuantizedLinear

    found: list[torch.nn.Module] = []
    for block in blocks:
        if any(isinstance(module, FlatQuantizedLinear) for module in block.modules()):
            continue
        for child in block.children():
            if isinstance(child, torch.nn.Linear | torch.nn.Sequential) or hooked(child):
                continue
            found.append(child)
    return found


def compile_insides(
    modules: Iterable[torch.nn.Module], options: Mapping[str, Any], on_failure: Callable[[BaseException], None]
) -> None:
    """Let each of ``modules`` run its class's compiled ``forward`` (compiled lazily, at the first call). If the
    compiler fails, ``on_failure`` is told and the call runs eagerly: the image is the same."""
    for module in modules:
        if module.__dict__.get(_MARK):
            continue
        cls = type(module)
        key = (cls, repr(sorted(options.items())))
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(cls.forward, **options)
        call = guard_compiled(_COMPILED[key], cls.forward, on_failure)
        module.forward = functools.partial(call, module)  # an instance attribute: shadows the class's forward
        module.__dict__[_MARK] = True


def uncompile_insides(modules: Iterable[torch.nn.Module]) -> None:
    """Back to the class's eager ``forward`` for each of ``modules``."""
    for module in modules:
        if module.__dict__.pop(_MARK, False):
            module.__dict__.pop("forward", None)


def insides_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs through :func:`compile_insides`' compiled forward."""
    return bool(module.__dict__.get(_MARK))
