"""Quantized linear layers whose weights are plain tensors, so that streaming can move them.

A quantized weight is a torchao tensor subclass (``Float8Tensor``: fp8 ``qdata`` and a per-row ``scale``;
``Int8Tensor`` likewise in int8). Code that moves weights by re-pointing ``tensor.data`` (our host homes,
diffusers' group offloading) cannot move such a wrapper: ``.data`` replaces only the outer shell, and the
inner tensors stay where they were. :class:`FlatQuantizedLinear` therefore keeps the *inner* tensors as
plain parameters of its own (``qdata``, ``scale``; a state dict saved meanwhile has those in place of
``weight``), which every mover handles, and re-wraps them on each call through PyTorch's subclass protocol
(``__tensor_flatten__``/``__tensor_unflatten__``). torchao still does all the arithmetic, so a flattened layer
gives bit for bit what the resident quantized layer gives.

Streaming fp8 blocks instead of bf16 ones halves the bytes that cross the host link per transformer pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .acceleration import QuantizationName, quantized_linears, quantized_weight

__all__ = ["FlatQuantizedLinear", "flatten_quantized_linears", "flattened_tensors", "restore_flattened_linears"]


class FlatQuantizedLinear(torch.nn.Module):
    """A linear layer with a quantized weight held as the plain inner tensors of its torchao subclass.

    Args:
        weight: the quantized weight (a traceable tensor subclass, such as torchao's ``Float8Tensor``).
        bias: the original layer's bias, shared (not copied): it keeps its host home.
        to: where the inner tensors go (the host, for streaming them from there).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.nn.Parameter | None, to: torch.device) -> None:
        super().__init__()
        names, context = weight.__tensor_flatten__()  # type: ignore[attr-defined]
        self._subclass = type(weight)
        self.inner_names: tuple[str, ...] = tuple(names)
        self._context = context
        self._size = weight.size()
        self._stride = weight.stride()
        self.out_features, self.in_features = weight.shape
        for name in names:
            inner = getattr(weight, name)
            if type(inner) is not torch.Tensor:
                raise TypeError(f"cannot flatten {type(weight).__name__}: its {name!r} is a {type(inner).__name__}")
            # Parameters, not buffers: diffusers' group offloading onloads a block's buffers but offloads only
            # its parameters (0.42), so buffers would stay on the GPU after their block ran (seen on the H200:
            # all 6 GiB of fp8 weights ended up there).
            self.register_parameter(name, torch.nn.Parameter(inner.to(to), requires_grad=False))
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        """The quantized weight, re-wrapped around the inner tensors wherever they are now."""
        inner = {name: getattr(self, name) for name in self.inner_names}
        return self._subclass.__tensor_unflatten__(inner, self._context, self._size, self._stride)  # type: ignore[attr-defined,no-any-return]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden_states, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._subclass.__name__}"


def flatten_quantized_linears(
    transformer: torch.nn.Module, kind: QuantizationName, device: torch.device, to: torch.device
) -> dict[str, torch.nn.Module]:
    """Replace each linear layer that quantization targets by a :class:`FlatQuantizedLinear`, one layer at a time:
    quantized on ``device`` (torchao makes fp8 only on a GPU), its inner tensors then moved to ``to``, so that
    the GPU never holds more than one layer's copy. Returns the original layers by name, untouched (their
    weights keep their host homes), for :func:`restore_flattened_linears`."""
    modules = dict(transformer.named_modules())
    originals: dict[str, torch.nn.Module] = {}
    try:
        for name, linear in quantized_linears(transformer).items():
            flat = FlatQuantizedLinear(quantized_weight(linear.weight, kind, device), linear.bias, to)
            _replace(modules, name, flat)
            originals[name] = linear
    except BaseException:
        restore_flattened_linears(transformer, originals)  # all or nothing: an error leaves the bf16 layers
        raise
    return originals


def restore_flattened_linears(transformer: torch.nn.Module, originals: Mapping[str, torch.nn.Module]) -> None:
    """Undo :func:`flatten_quantized_linears`: the original layers back in their places."""
    modules = dict(transformer.named_modules())
    for name, linear in originals.items():
        _replace(modules, name, linear)


def flattened_tensors(transformer: torch.nn.Module) -> list[torch.Tensor]:
    """The inner tensors of every flattened layer (their host homes are freed when the layers go)."""
    tensors: list[torch.Tensor] = []
    for module in transformer.modules():
        if isinstance(module, FlatQuantizedLinear):
            tensors.extend(getattr(module, name) for name in module.inner_names)
    return tensors


def _replace(modules: Mapping[str, Any], name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(modules[parent], child, module)
