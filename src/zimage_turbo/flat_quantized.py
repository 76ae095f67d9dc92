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

Eagerly, torchao quantizes each activation in several kernels of its own (absolute value, row maxima, scale,
division, cast), each reading or writing the whole activation: more GPU time than the fp8 matmul itself, so
eager fp8 is slower than bf16 (1.36 s against 1.19 s of denoising on the H200, 1.91 s against 1.23 s on an
H100, whose memory is slower). Resident fp8 layers are compiled with their blocks; streamed blocks cannot be
(their hooks move weights), so :func:`compile_flat_linears` compiles the layers' own arithmetic instead:
the same torchao steps, called on the inner tensors (a graph cannot build the subclass), which Inductor fuses
into one quantization kernel before the matmul.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, cast

import torch

from .failures import guard_compiled
from .host import HostHomes
from .quantize import QuantizationName, quantized_linears, quantized_weight

__all__ = [
    "FlatQuantizedLinear",
    "compilable_flat_linears",
    "compile_flat_linears",
    "flatten_quantized_linears",
    "flattened_tensors",
    "inner_specs",
    "restore_flattened_linears",
    "uncompile_flat_linears",
]


class FlatQuantizedLinear(torch.nn.Module):
    """A linear layer with a quantized weight held as the plain inner tensors of its torchao subclass.

    Args:
        weight: the quantized weight (a traceable tensor subclass, such as torchao's ``Float8Tensor``).
        bias: the original layer's bias, shared (not copied): it keeps its host home.
        slots: where the inner tensors are kept, one per inner tensor in :func:`inner_specs` order (host
            homes, for streaming them from there); they are filled here, asynchronously from a GPU.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.nn.Parameter | None, slots: Sequence[torch.Tensor]) -> None:
        super().__init__()
        names, context = _flatten(weight)
        self._subclass = type(weight)
        self.inner_names: tuple[str, ...] = tuple(names)
        self._context = context
        self._size = weight.size()
        self._stride = weight.stride()
        self.out_features, self.in_features = weight.shape
        for name, slot in zip(names, slots, strict=True):
            slot.copy_(getattr(weight, name), non_blocking=True)
            # Parameters, not buffers: diffusers' group offloading onloads a block's buffers but offloads only
            # its parameters (0.42), so buffers would stay on the GPU after their block ran (seen on the H200:
            # all 6 GiB of fp8 weights ended up there).
            self.register_parameter(name, torch.nn.Parameter(slot, requires_grad=False))
        self.bias = bias
        #: the arguments of :func:`_fp8_rowwise_linear` besides the tensors, where it computes what torchao does
        self.fp8_options = _fp8_rowwise_options(weight)
        self.compiled: Callable[..., torch.Tensor] | None = None  # see compile_flat_linears

    @property
    def weight(self) -> torch.Tensor:
        """The quantized weight, re-wrapped around the inner tensors wherever they are now."""
        inner = {name: getattr(self, name) for name in self.inner_names}
        return self._subclass.__tensor_unflatten__(inner, self._context, self._size, self._stride)  # type: ignore[attr-defined,no-any-return]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            return self.compiled(hidden_states, self.qdata, self.scale, self.bias, *(self.fp8_options or ()))
        return torch.nn.functional.linear(hidden_states, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._subclass.__name__}"


def _fp8_rowwise_options(weight: torch.Tensor) -> tuple[Any, ...] | None:
    """(fp8 dtype, activation scale bounds, matmul settings) when ``weight`` is one that
    :func:`_fp8_rowwise_linear` computes exactly as torchao does: a ``Float8Tensor`` with per-row scales whose
    activations are quantized per row, with torch's kernels (torchao prefers MSLK's where installed). Else None."""
    try:
        from torchao.quantization import PerRow
        from torchao.quantization.quantize_.workflows import Float8Tensor, QuantizeTensorToFloat8Kwargs
        from torchao.quantization.quantize_.workflows.float8.float8_tensor import _is_mslk_available
    except ImportError:  # another torchao: the layer stays on the subclass's own (eager) path
        return None
    activations = getattr(weight, "act_quant_kwargs", None)
    if not (
        isinstance(weight, Float8Tensor)
        and isinstance(activations, QuantizeTensorToFloat8Kwargs)
        and isinstance(activations.granularity, PerRow)
        and weight.mm_config is not None
        and not weight.mm_config.pad_inner_dim
        and weight.scale.shape == (weight.shape[0], 1)
        and not _is_mslk_available()
    ):
        return None
    return (activations.float8_dtype, activations.hp_value_lb, activations.hp_value_ub, weight.mm_config.use_fast_accum)


def _fp8_rowwise_linear(
    hidden_states: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    float8_dtype: torch.dtype,
    lower: float | None,
    upper: float | None,
    fast_accum: bool,
) -> torch.Tensor:
    """``F.linear`` with a per-row fp8 weight, step by step as torchao's ``Float8Tensor`` takes it (quantize the
    activation per row, then a scaled matmul), but on the inner tensors, so that a compiled graph can hold it."""
    from torchao.float8.inference import addmm_float8_unwrapped_inference, preprocess_scale
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    rows = [1] * (hidden_states.dim() - 1) + [hidden_states.shape[-1]]  # PerRow's block: one row
    row_scale = _choose_scale_float8(
        hidden_states, block_size=rows, float8_dtype=float8_dtype, hp_value_lb=lower, hp_value_ub=upper
    )
    quantized = _quantize_affine_float8(hidden_states, row_scale, float8_dtype)
    # the weight transposed, as F.linear hands it on: column-major already, as the matmul wants it
    out = addmm_float8_unwrapped_inference(
        quantized.reshape(-1, quantized.shape[-1]).contiguous(),
        preprocess_scale(row_scale, hidden_states.shape),
        qdata.t(),
        scale.t(),
        output_dtype=hidden_states.dtype,
        bias=bias,
        use_fast_accum=fast_accum,
    )
    result: torch.Tensor = out.reshape(*hidden_states.shape[:-1], qdata.shape[0])
    return result


_compiled_fp8_linear: Callable[..., torch.Tensor] | None = None


def compilable_flat_linears(transformer: torch.nn.Module) -> Iterable[FlatQuantizedLinear]:
    """The flattened layers of ``transformer`` that :func:`compile_flat_linears` can compile."""
    for module in transformer.modules():
        if isinstance(module, FlatQuantizedLinear) and module.fp8_options is not None:
            yield module


def compile_flat_linears(layers: Iterable[torch.nn.Module], on_failure: Callable[[BaseException], None]) -> None:
    """Let each of ``layers`` (from :func:`compilable_flat_linears`) compute through one compiled function (shapes
    dynamic: one graph for every layer and token count). If the compiler fails, ``on_failure`` is told and the
    call runs the same steps eagerly (the image is the same)."""
    global _compiled_fp8_linear
    if _compiled_fp8_linear is None:
        _compiled_fp8_linear = torch.compile(_fp8_rowwise_linear, dynamic=True, fullgraph=True)
    linear = guard_compiled(_compiled_fp8_linear, _fp8_rowwise_linear, on_failure)
    for layer in layers:
        cast(FlatQuantizedLinear, layer).compiled = linear


def uncompile_flat_linears(layers: Iterable[torch.nn.Module]) -> None:
    """Back to torchao's eager path for each of ``layers``."""
    for layer in layers:
        cast(FlatQuantizedLinear, layer).compiled = None


def inner_specs(weight: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each inner tensor of a quantized weight, in the order :class:`FlatQuantizedLinear` keeps
    them."""
    names, _ = _flatten(weight)
    return [(tuple(getattr(weight, name).shape), getattr(weight, name).dtype) for name in names]


def _flatten(weight: torch.Tensor) -> tuple[list[str], Any]:
    names, context = weight.__tensor_flatten__()  # type: ignore[attr-defined]
    for name in names:
        inner = getattr(weight, name)
        if type(inner) is not torch.Tensor:
            raise TypeError(f"cannot flatten {type(weight).__name__}: its {name!r} is a {type(inner).__name__}")
    return list(names), context


def flatten_quantized_linears(
    transformer: torch.nn.Module,
    kind: QuantizationName,
    device: torch.device,
    homes: HostHomes,
    blocks: Collection[str] | None = None,
) -> dict[str, torch.nn.Module]:
    """Replace each linear layer that quantization targets (in ``blocks`` only, when given: block names such as
    ``"layers.3"``) by a :class:`FlatQuantizedLinear` whose inner tensors live in host homes of their own.

    Each layer is quantized on ``device`` (torchao makes fp8 only on a GPU) from its bf16 weight, one at a time,
    and copied straight into pinned slots reserved for all of them at once (pinning gigabytes is slow on one
    thread; :meth:`HostHomes.reserve` spreads it): the GPU holds one layer's copies at a time, and the host no
    pageable copy. The first layer of each shape is quantized before the reservation, to learn its inner
    tensors' shapes. Returns the original layers by name, untouched (their weights keep their homes), for
    :func:`restore_flattened_linears`. All or nothing: after an error the bf16 layers are all in place.
    """
    layers = quantized_linears(transformer, blocks)
    first: dict[str, torch.Tensor] = {}  # the first quantized weight of each shape, to learn its inner tensors
    layouts: dict[tuple[int, ...], list[tuple[tuple[int, ...], torch.dtype]]] = {}
    for name, linear in layers.items():
        shape = tuple(linear.weight.shape)
        if shape not in layouts:
            first[name] = quantized_weight(linear.weight, kind, device)
            layouts[shape] = inner_specs(first[name])
    slots, group = homes.reserve(spec for linear in layers.values() for spec in layouts[tuple(linear.weight.shape)])
    modules = dict(transformer.named_modules())
    originals: dict[str, torch.nn.Module] = {}
    taken = 0
    try:
        for name, linear in layers.items():
            count = len(layouts[tuple(linear.weight.shape)])
            weight = first.pop(name, None)
            if weight is None:
                weight = quantized_weight(linear.weight, kind, device)
            flat = FlatQuantizedLinear(weight, linear.bias, slots[taken : taken + count])
            for inner_name, slot in zip(flat.inner_names, slots[taken : taken + count], strict=True):
                homes.claim(getattr(flat, inner_name), slot, group)
            taken += count
            _replace(modules, name, flat)
            originals[name] = linear
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the slots are filled asynchronously
    except BaseException:
        restore_flattened_linears(transformer, originals)
        homes.forget_group(group)
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
