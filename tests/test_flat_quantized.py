"""Quantized streaming: flattened quantized layers compute what torchao's resident ones do, ``streamed`` with
``quantize`` gives the resident quantized image, and a switch back gives the bf16 image and frees the copies.

fp8 layers are made on the CPU here with torchao's ``Float8Tensor.from_hp`` (its ``quantize_`` makes fp8 only
on a GPU, which tests/gpu covers); the whole pipeline runs in int8, the CPU's quantization."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import zimage_turbo.flat_quantized as flat_quantized
from test_generator import same
from zimage_turbo import (
    CPUOnly,
    FullGPU,
    Generator,
    GPUInfo,
    Hardware,
    ModelProfile,
    StreamedOffload,
    ZImageSettings,
    plan,
    quantize,
)
from zimage_turbo.flat_quantized import FlatQuantizedLinear, flatten_quantized_linears, flattened_tensors, inner_specs
from zimage_turbo.hardware import GIB
from zimage_turbo.speedups import compile as compiling
from zimage_turbo.strategies.base import host_homes

PROMPT = "a red fox in fresh snow at dawn"
CPU = torch.device("cpu")
SIZE = {"height": 256, "width": 256, "steps": 2}


def _settings(checkpoint: Path, **changes: object) -> ZImageSettings:
    return ZImageSettings(model=str(checkpoint), source="local", progress=False, **changes)


def _pixels(image: object) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _fp8_weight(weight: torch.Tensor) -> torch.Tensor:
    """What fp8 quantization gives (per-row scales, activations quantized per call), made on the CPU."""
    from torchao.float8.inference import Float8MMConfig
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import (
        Float8Tensor,
        QuantizeTensorToFloat8Kwargs,
    )

    activations = QuantizeTensorToFloat8Kwargs(granularity=PerRow(), hp_value_lb=quantize.FP8_ROW_FLOOR)
    return Float8Tensor.from_hp(
        weight, granularity=PerRow(), mm_config=Float8MMConfig(use_fast_accum=True), act_quant_kwargs=activations
    )


@pytest.mark.quant
def test_a_flattened_fp8_layer_computes_what_the_quantized_weight_does() -> None:
    torch.manual_seed(0)
    weight = torch.randn(64, 128, dtype=torch.bfloat16)
    bias = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    quantized = _fp8_weight(weight)
    slots = [torch.empty(shape, dtype=dtype) for shape, dtype in inner_specs(quantized)]
    layer = FlatQuantizedLinear(quantized, bias, slots)
    # what movers see: plain tensors, one byte per weight, and the original bias (shared, not copied)
    inner = {name: tensor for name, tensor in layer.named_parameters() if name != "bias"}
    assert set(inner) == set(layer.inner_names) == {"qdata", "scale"}
    assert all(type(t.data) is torch.Tensor and not t.requires_grad for t in inner.values())
    assert inner["qdata"].dtype == torch.float8_e4m3fn and layer.bias is bias and not list(layer.buffers())
    assert [t.data_ptr() for t in inner.values()] == [t.data_ptr() for t in slots]  # kept in the given slots
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x, quantized, bias)
    assert torch.equal(layer(x), expected)
    # Re-pointing the inner tensors (as host homes and group offloading do) moves what the layer reads.
    for name, tensor in inner.items():
        getattr(layer, name).data = tensor.clone()
    assert torch.equal(layer(x), expected)
    layer.qdata.data = torch.zeros_like(layer.qdata)
    assert not layer(x).abs().gt(bias.abs() + 1e-2).any()  # zero weights: only the bias is left
    assert "Float8Tensor" in repr(layer)


@pytest.mark.quant
def test_compiled_fp8_layers_compute_what_torchao_does_and_go_back_to_eager_when_the_compiler_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Streamed blocks run eagerly; only their fp8 layers' arithmetic is compiled (the ``fp8_linears`` part)."""
    from torch._dynamo.exc import TorchDynamoException

    torch.manual_seed(1)
    quantized = _fp8_weight(torch.randn(48, 64, dtype=torch.bfloat16))
    bias = torch.nn.Parameter(torch.randn(48, dtype=torch.bfloat16))
    layer = FlatQuantizedLinear(quantized, bias, [torch.empty(s, dtype=d) for s, d in inner_specs(quantized)])
    pipe = SimpleNamespace(transformer=torch.nn.Sequential(layer))
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    x[0, 3] = 0  # a padding row: its scale is the floor, not 0/0
    expected = torch.nn.functional.linear(x, quantized, bias)
    # Step by step on the inner tensors, eagerly: bit for bit what torchao's subclass computes.
    assert layer.fp8_options is not None
    stepwise = flat_quantized._fp8_rowwise_linear(x, layer.qdata, layer.scale, bias, *layer.fp8_options)
    assert torch.equal(stepwise, expected)
    part = next(part for part in compiling.COMPILE_PARTS if part.name == "fp8_linears")
    assert part.inside_hooks and part.modules(pipe) == [layer] and not part.compiled(pipe)
    failures: list[str] = []
    compiling.compile_part(pipe, part, lambda failed, exc: failures.append(f"{failed.name}: {exc}"))
    assert part.compiled(pipe)
    with torch.inference_mode():  # as the Generator runs (the bias is a trainable Parameter)
        compiled = layer(x)  # Inductor fuses the activation's quantization: fp8 rounding may differ in places
        assert layer(torch.randn(3, 11, 64, dtype=torch.bfloat16)).shape == (3, 11, 48)  # dynamic shapes
    assert torch.isfinite(compiled).all() and (compiled - expected).abs().max() <= 0.1 * expected.abs().max()

    # A compiler error: this call runs the same steps eagerly, later ones torchao's own path, and the
    # SpeedupDriver is told.
    def broken(*args: object) -> torch.Tensor:
        raise TorchDynamoException("cannot trace this")

    monkeypatch.setattr(flat_quantized, "_compiled_fp8_linear", broken)
    compiling.compile_part(pipe, part, lambda failed, exc: failures.append(f"{failed.name}: {exc}"))
    assert torch.equal(layer(x), expected)
    assert failures == ["fp8_linears: cannot trace this"] and not part.compiled(pipe)
    compiling.compile_part(pipe, part, lambda failed, exc: None)
    compiling.uncompile_part(pipe, part)
    assert not part.compiled(pipe) and torch.equal(layer(x), expected)


@pytest.mark.quant
def test_an_inner_tensor_that_is_itself_a_subclass_is_refused() -> None:
    # Movers would re-point only its outer shell, as with the quantized weight itself.
    quantized = _fp8_weight(torch.randn(16, 32, dtype=torch.bfloat16))
    quantized.scale = torch.nn.Parameter(quantized.scale, requires_grad=False)
    with pytest.raises(TypeError, match="cannot flatten Float8Tensor: its 'scale' is a Parameter"):
        inner_specs(quantized)


@pytest.mark.quant
def test_streamed_int8_gives_the_resident_int8_image_and_switching_back_gives_bf16(tiny_checkpoint: Path) -> None:
    resident = Generator(settings=_settings(tiny_checkpoint), strategy=FullGPU(device="cpu", quantize="int8"))
    expected = resident.generate(PROMPT, seed=5, **SIZE).image
    plain = Generator(settings=_settings(tiny_checkpoint), strategy="cpu").generate(PROMPT, seed=5, **SIZE).image

    generator = Generator(settings=_settings(tiny_checkpoint), strategy=StreamedOffload(device="cpu", quantize="int8"))
    streamed = generator.generate(PROMPT, seed=5, **SIZE)
    assert streamed.strategy == "streamed" and streamed.quantization == "int8"
    assert same(streamed.image, expected)  # the same quantized weights, streamed: the same image
    transformer = generator.pipeline.transformer
    flattened = flattened_tensors(transformer)
    assert len(flattened) >= 2 * len(quantize.quantized_linears(resident.pipeline.transformer)) > 0
    assert not quantize.quantized_linears(transformer)  # every targeted layer is flattened
    homes = host_homes(generator.pipeline)
    assert homes.has_home(flattened)  # streamed from host homes, like the bf16 blocks

    generator.switch(CPUOnly())
    back = generator.generate(PROMPT, seed=5, **SIZE)
    assert back.quantization is None and same(back.image, plain)
    assert not flattened_tensors(transformer) and quantize.quantized_linears(transformer)
    assert not any(homes.has_home([tensor]) for tensor in flattened)  # the quantized copies are forgotten
    assert all(type(linear.weight) is torch.nn.Parameter for linear in quantize.quantized_linears(transformer).values())


@pytest.mark.quant
def test_an_error_while_flattening_leaves_every_bf16_layer_in_place(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = Generator(settings=_settings(tiny_checkpoint), strategy="cpu")
    expected = generator.generate(PROMPT, seed=5, **SIZE).image
    transformer = generator.pipeline.transformer
    layers = quantize.quantized_linears(transformer)
    homes = host_homes(generator.pipeline)
    groups = len(homes._groups)
    # past the first layer of each shape (quantized before the slots are reserved): some layers are flattened
    fail_at = len({tuple(linear.weight.shape) for linear in layers.values()}) + 2
    made = []

    def failing(weight: torch.Tensor, kind: quantize.QuantizationName, device: torch.device) -> torch.Tensor:
        if len(made) == fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        made.append(weight)
        return quantize.quantized_weight(weight, kind, device)

    monkeypatch.setattr(flat_quantized, "quantized_weight", failing)
    with pytest.raises(torch.OutOfMemoryError):
        flatten_quantized_linears(transformer, "int8", CPU, homes)
    assert len(made) == fail_at < len(layers)
    assert quantize.quantized_linears(transformer) == layers and not flattened_tensors(transformer)
    assert len(homes._groups) == groups  # the reserved slots are forgotten, not leaked
    assert same(generator.generate(PROMPT, seed=5, **SIZE).image, expected)


def _card(gib: float) -> Hardware:
    gpu = GPUInfo(0, "card", total_bytes=int(gib * GIB), free_bytes=int(gib * GIB), compute_capability=(9, 0))
    return Hardware(gpus=(gpu,), host_total_bytes=128 * GIB, host_available_bytes=120 * GIB)


def test_the_planner_streams_fp8_blocks_on_the_smallest_cards() -> None:
    profile = ModelProfile.z_image_turbo()
    small = plan(profile, _card(4), quantize="fp8")
    fp8 = next(c for c in small.candidates if c.name == "streamed+fp8")
    bf16 = next(c for c in small.candidates if c.name == "streamed")
    # half the bytes cross the link per pass, so it is predicted faster, with the same GPU peak...
    assert fp8.fits and fp8.seconds < bf16.seconds and fp8.peak_bytes <= bf16.peak_bytes
    # ...and the fp8 copies' pinned homes come on top of the bf16 ones (kept for a switch back)
    extra = fp8.estimate.host_bytes - bf16.estimate.host_bytes
    assert 5 * GIB < extra < 7 * GIB
    # the best streams fp8 blocks too, keeping the few that fit (partial); lossless, only bf16 placements
    assert small.best is not None and small.best.strategy.quantize == "fp8" and small.best.seconds <= fp8.seconds
    assert plan(profile, _card(4)).best.strategy.quantize is None  # type: ignore[union-attr]
    # Where the fp8 transformer fits, keeping all of it resident beats streaming it.
    best = plan(profile, _card(12), quantize="fp8").best
    assert best is not None and best.strategy.quantize == "fp8"
    blocks = len(profile.transformer.block_bytes)
    assert best.name == "hybrid+fp8" or getattr(best.strategy, "transformer_blocks", 0) == blocks


@pytest.mark.quant
def test_an_explicit_quantization_applies_to_streamed_by_name(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(StreamedOffload, "target", lambda self, hardware: CPU)  # "streamed" on the CPU
    generator = Generator(settings=_settings(tiny_checkpoint, quantization="int8"), strategy="streamed")
    result = generator.generate(PROMPT, seed=5, **SIZE)
    assert result.strategy == "streamed" and result.quantization == "int8"
