"""The speed-ups on the CPU: attention settings, the compile decision, regional compile, quantized rungs.

Kernel timings and fp8 need a GPU (tests/gpu/test_gpu_acceleration.py). Here: what is refused before loading, the
compile rules, that compiled blocks (Dynamo's tracing, with the "eager" backend: Inductor's code generation is
what takes time, not what is tested here) give the eager image bit for bit, that int8 quantization swaps
weights in and out without losing the originals, and how the planner ranks quantized rungs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import zimage_turbo.machine
from test_generator import same
from zimage_turbo import (
    CPUOnly,
    FullGPU,
    Generator,
    GPUInfo,
    Hardware,
    Hybrid,
    InvalidSettingsError,
    ModelProfile,
    StrategyUnavailableError,
    StreamedOffload,
    ZImageSettings,
    plan,
    quantize,
)
from zimage_turbo.hardware import GIB
from zimage_turbo.speedups import SpeedupDriver, attention
from zimage_turbo.speedups import compile as compiling
from zimage_turbo.speedups import compile_advisor as advising

PROMPT = "a red fox in fresh snow at dawn"
CPU = torch.device("cpu")
SIZE = {"height": 256, "width": 256}


@pytest.fixture
def eager_compile(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(compiling.COMPILE_OPTIONS, "backend", "eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _settings(checkpoint: Path, **changes: object) -> ZImageSettings:
    return ZImageSettings(model=str(checkpoint), source="local", progress=False, **changes)


def _pixels(image: object) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# -- attention -------------------------------------------------------------------------------------------


def test_off_cuda_the_automatic_kernel_is_the_default_without_measuring() -> None:
    assert attention.choose_attention(CPU, torch.float32, attention.AttentionShape(1, 4224, 30, 128)) == ("native", {})


def test_kernel_availability_says_why() -> None:
    assert attention.attention_available("native", CPU) == ""
    assert "CUDA" in attention.attention_available("cudnn", CPU)
    assert "unknown attention kernel 'fast'" in attention.attention_available("fast", CPU)
    missing = [name for name, package in (("flash_attn", "flash_attn"), ("sage", "sageattention")) if not _has(package)]
    for name in missing:
        assert "package" in attention.attention_available(name, torch.device("cuda"))


def _has(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def test_a_kernel_that_cannot_run_here_is_refused_before_loading(tiny_checkpoint: Path) -> None:
    generator = Generator(settings=_settings(tiny_checkpoint, attention="cudnn"), strategy="cpu")
    with pytest.raises(InvalidSettingsError, match="attention='cudnn' cannot run on cpu"):
        generator.generate(PROMPT, seed=1, **SIZE)
    assert not generator.is_loaded


def test_a_forced_kernel_falls_back_to_the_default_where_a_strategy_moved_the_model(
    tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    accelerator = SpeedupDriver("cudnn", "off", Path("unused"))
    generator = Generator(settings=_settings(tiny_checkpoint), strategy="cpu").load()
    accelerator.prepare(generator.pipeline, CPU, torch.float32, False, (256, 256, {}))
    assert accelerator.attention == "native" and "cannot run on cpu" in caplog.text


def test_the_result_names_the_kernel(tiny_checkpoint: Path) -> None:
    result = Generator(settings=_settings(tiny_checkpoint), strategy="cpu").generate(PROMPT, seed=1, **SIZE)
    assert result.attention == "native" and result.compiled == () and result.quantization is None


def test_preparing_the_speed_ups_is_timed_as_prepare_not_as_recovery(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timing a new shape's attention kernels or setting up a compile is not a recovery from anything: the
    compiled cold start's first image read 3.5 s of "recovery" with no fallback (H200, 2026-11-29)."""

    real = SpeedupDriver.prepare

    def slow(self: SpeedupDriver, *args: object, **kwargs: object) -> None:
        time.sleep(0.3)  # what timing the attention kernels of a new shape can take on a GPU
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SpeedupDriver, "prepare", slow)
    timings = Generator(settings=_settings(tiny_checkpoint), strategy="cpu").generate(PROMPT, seed=1, **SIZE).timings
    assert timings.prepare >= 0.3 and timings.recovery < 0.1
    parts = timings.load + timings.prepare + timings.work + timings.recovery
    assert timings.total == pytest.approx(parts) and timings.to_dict()["prepare"] == timings.prepare


def test_an_unknown_kernel_name_is_an_invalid_setting() -> None:
    with pytest.raises(InvalidSettingsError, match="attention"):
        ZImageSettings(attention="fastest")


# -- when to compile --------------------------------------------------------------------------------------


def test_on_and_off_do_what_they_say(tmp_path: Path) -> None:
    assert advising.CompileAdvisor("on", tmp_path, "k").should_compile(0.0)
    assert advising.CompileAdvisor("all", tmp_path, "k").should_compile(0.0)
    assert not advising.CompileAdvisor("off", tmp_path, "k").should_compile(1e9)


def test_on_compiles_the_blocks_at_once_and_leaves_the_small_parts_to_the_auto_rule(tmp_path: Path) -> None:
    # The text encoder and the VAE decoder save 0.02 and 0.04 s per image for 52 and 21 s of compiling (12.6 and
    # 3.4 s from a warm kernel cache) on the H200: compiling them at once made the first compiled image 4x later.
    on, every = SpeedupDriver("native", "on", tmp_path), SpeedupDriver("native", "all", tmp_path)
    modes = {part.name: (on.part_mode(part), every.part_mode(part)) for part in compiling.COMPILE_PARTS}
    assert modes == {
        "blocks": ("on", "all"),
        "text_encoder": ("auto", "all"),
        "vae_decoder": ("auto", "all"),
        "fp8_linears": ("on", "all"),
    }
    # under "on" the small parts still compile once the work pays for them
    work = {"encode": 1e4, "denoise": 1.0, "decode": 1e4}
    advisors = {part.name: on._advisor(part, CPU, torch.float32, None) for part in compiling.COMPILE_PARTS}
    assert all(advisor.should_compile(work[advisor.part.phase]) for advisor in advisors.values())
    assert not advisors["text_encoder"].should_compile(1.0) and not advisors["vae_decoder"].should_compile(1.0)


def test_known_work_compiles_when_its_saving_covers_the_compile(tmp_path: Path) -> None:
    advisor = advising.CompileAdvisor("auto", tmp_path, "k")
    assert advisor.expected_compile_s == compiling.DEFAULT_COMPILE_SECONDS
    break_even = compiling.DEFAULT_COMPILE_SECONDS / compiling.COMPILE_SAVING
    assert not advisor.should_compile(0.9 * break_even)
    assert advisor.should_compile(1.1 * break_even)


def test_work_arriving_one_image_at_a_time_compiles_once_it_has_paid_the_compile(tmp_path: Path) -> None:
    """Ski rental: compile once the eager time already spent would have saved the compile's cost."""
    advisor = advising.CompileAdvisor("auto", tmp_path, "k")
    per_image = 1.2
    images = 0
    while not advisor.should_compile(per_image):
        advisor.ran_eager(per_image)
        images += 1
    spent = images * per_image
    assert (
        spent * compiling.COMPILE_SAVING
        < compiling.DEFAULT_COMPILE_SECONDS
        <= (spent + per_image) * compiling.COMPILE_SAVING
    )
    # never more than twice the best choice in hindsight: the eager time wasted is at most the compile cost
    assert spent * compiling.COMPILE_SAVING <= compiling.DEFAULT_COMPILE_SECONDS


def test_a_measured_compile_time_is_what_the_next_advisor_expects(tmp_path: Path) -> None:
    advising.CompileAdvisor("auto", tmp_path, "torch x / GPU y / bfloat16").compiled_in(3.25)
    records = json.loads((tmp_path / "zimage-turbo-compile-times.json").read_text())
    assert records == {"torch x / GPU y / bfloat16": 3.25}
    assert advising.CompileAdvisor("auto", tmp_path, "torch x / GPU y / bfloat16").expected_compile_s == 3.25
    # another device or PyTorch version starts from the default
    assert advising.CompileAdvisor("auto", tmp_path, "other").expected_compile_s == compiling.DEFAULT_COMPILE_SECONDS


def test_each_part_has_its_own_cost_saving_and_record(tmp_path: Path) -> None:
    """The text encoder saves a share of the encode, not of the denoising, and costs its own compile time;
    fp8 blocks expect a larger saving than bf16 ones (activation quantization fuses away)."""
    blocks, text_encoder, *_ = compiling.COMPILE_PARTS
    advisor = advising.CompileAdvisor("auto", tmp_path, "k / text_encoder", text_encoder)
    assert advisor.expected_compile_s == compiling.TEXT_ENCODER_COMPILE_SECONDS
    break_even = compiling.TEXT_ENCODER_COMPILE_SECONDS / compiling.TEXT_ENCODER_SAVING
    assert not advisor.should_compile(0.9 * break_even) and advisor.should_compile(1.1 * break_even)
    advisor.compiled_in(12.5)
    assert advising.CompileAdvisor("auto", tmp_path, "k / text_encoder", text_encoder).expected_compile_s == 12.5
    assert (
        advising.CompileAdvisor("auto", tmp_path, "k", blocks).expected_compile_s == compiling.DEFAULT_COMPILE_SECONDS
    )
    accelerator = SpeedupDriver("native", "auto", tmp_path)
    bf16 = accelerator._advisor(blocks, CPU, torch.bfloat16, None)
    fp8 = accelerator._advisor(blocks, CPU, torch.bfloat16, "fp8")
    assert bf16 is not fp8 and fp8.saving > bf16.saving == compiling.COMPILE_SAVING


def test_known_work_pays_for_each_part_from_its_own_phase(tmp_path: Path) -> None:
    """Work ahead whose denoising covers the blocks' compile, with a short encode and decode, pays for the
    blocks alone."""
    upcoming = {
        "encode": 1.0,
        "denoise": 2 * compiling.DEFAULT_COMPILE_SECONDS / compiling.COMPILE_SAVING,
        "decode": 1.0,
    }
    decisions = {
        part.name: advising.CompileAdvisor("auto", tmp_path, part.name, part).should_compile(upcoming[part.phase])
        for part in compiling.COMPILE_PARTS
    }
    # (the fp8 layers of streamed blocks are compiled from the denoising time too; only streamed fp8 has them)
    assert decisions == {"blocks": True, "text_encoder": False, "vae_decoder": False, "fp8_linears": True}


def test_parts_leave_compile_when_the_strategy_cannot_run_them_compiled(
    tiny_checkpoint: Path, tmp_path: Path, eager_compile: None
) -> None:
    pipe = Generator(settings=_settings(tiny_checkpoint, compile="off"), strategy="cpu").load().pipeline
    accelerator = SpeedupDriver("native", "all", tmp_path)
    accelerator.prepare(pipe, CPU, torch.float32, True, (256, 256, {}), placement=1)
    assert accelerator.compiled == ("blocks", "text_encoder", "vae_decoder") == compiling.compiled_parts(pipe)
    accelerator.prepare(pipe, CPU, torch.float32, False, (256, 256, {}), placement=2)
    assert accelerator.compiled == () == compiling.compiled_parts(pipe)
    # "auto" never compiles on a CPU ("all" above does; "on" compiles the blocks, whatever work is ahead)
    automatic = SpeedupDriver("native", "auto", tmp_path)
    automatic.prepare(pipe, CPU, torch.float32, True, (256, 256, {"denoise": 1e9}), placement=3)
    assert automatic.compiled == () == compiling.compiled_parts(pipe)
    blocks_now = SpeedupDriver("native", "on", tmp_path)
    work = {"encode": 1e9, "denoise": 1e9, "decode": 1e9}
    blocks_now.prepare(pipe, CPU, torch.float32, True, (256, 256, work), placement=4)
    assert blocks_now.compiled == ("blocks",) == compiling.compiled_parts(pipe)


def test_a_damaged_record_file_means_no_record(tmp_path: Path) -> None:
    (tmp_path / "zimage-turbo-compile-times.json").write_text("{not json")
    assert advising.CompileAdvisor("auto", tmp_path, "k").expected_compile_s == compiling.DEFAULT_COMPILE_SECONDS
    (tmp_path / "zimage-turbo-compile-times.json").write_text('{"k": "NaN", "j": [1]}')
    assert advising.CompileAdvisor("auto", tmp_path, "k").expected_compile_s == compiling.DEFAULT_COMPILE_SECONDS


def test_compile_cache_folder_follows_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert compiling.compile_cache_dir(tmp_path / "cache") == tmp_path / "cache" / "torch-compile"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compiling.compile_cache_dir(None) == tmp_path / "xdg" / "zimage-turbo" / "torch-compile"


# -- regional compile ----------------------------------------------------------------------------------------


def test_compiled_parts_give_the_eager_image_and_leave_with_a_streaming_strategy(
    tiny_checkpoint: Path, tmp_path: Path, eager_compile: None
) -> None:
    eager = Generator(settings=_settings(tiny_checkpoint, compile="off"), strategy="cpu")
    reference = eager.generate(PROMPT, seed=4, **SIZE).image
    settings = _settings(tiny_checkpoint, compile="all", cache_dir=tmp_path)
    generator = Generator(settings=settings, strategy="cpu")
    first = generator.generate(PROMPT, seed=4, **SIZE)
    everything = ("blocks", "text_encoder", "vae_decoder")
    assert first.compiled == everything == compiling.compiled_parts(generator.pipeline)
    assert same(first.image, reference)
    # Streaming hooks the blocks and the text encoder: they run eagerly there, with the same image.
    generator.switch(StreamedOffload(device="cpu"))
    streamed = generator.generate(PROMPT, seed=4, **SIZE)
    assert "blocks" not in streamed.compiled and "text_encoder" not in streamed.compiled
    assert same(streamed.image, reference)
    generator.switch(CPUOnly())
    assert generator.generate(PROMPT, seed=4, **SIZE).compiled == everything
    # each part's compile was timed and recorded where the settings keep caches
    records = json.loads((tmp_path / "torch-compile" / "zimage-turbo-compile-times.json").read_text())
    key = advising.compile_key(CPU, torch.float32)
    assert sorted(records) == [key, f"{key} / text_encoder", f"{key} / vae_decoder"]
    assert all(math.isfinite(value) for value in records.values())


def test_a_compiler_failure_costs_speed_not_the_image(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A graph Dynamo cannot trace (fullgraph) fails on the first call: that call and every later one run
    eagerly, with the eager image, and the part is never compiled again in this Generator."""
    reference = Generator(settings=_settings(tiny_checkpoint, compile="off"), strategy="cpu")
    expected = reference.generate(PROMPT, seed=5, **SIZE).image
    monkeypatch.setitem(compiling.COMPILE_OPTIONS, "backend", "eager")
    monkeypatch.setitem(compiling.COMPILE_OPTIONS, "fullgraph", True)
    torch._dynamo.reset()
    decoder_class = type(Generator(settings=_settings(tiny_checkpoint), strategy="cpu").load().pipeline.vae.decoder)
    untraceable = decoder_class.forward

    def forward(self: torch.nn.Module, *args: object, **kwargs: object) -> object:
        torch._dynamo.graph_break()  # with fullgraph=True, Dynamo refuses the whole graph
        return untraceable(self, *args, **kwargs)

    monkeypatch.setattr(decoder_class, "forward", forward)
    generator = Generator(settings=_settings(tiny_checkpoint, compile="all"), strategy="cpu")
    try:
        first = generator.generate(PROMPT, seed=5, **SIZE)
        second = generator.generate(PROMPT, seed=5, **SIZE)
    finally:
        torch._dynamo.reset()
    assert same(first.image, expected) and same(second.image, expected)
    assert first.compiled == second.compiled == ("blocks", "text_encoder")
    assert "torch.compile failed on vae_decoder" in caplog.text


def test_a_part_behind_offloading_hooks_is_not_compiled(tiny_checkpoint: Path, eager_compile: None) -> None:
    generator = Generator(settings=_settings(tiny_checkpoint, compile="on"), strategy="cpu").load()
    pipe = generator.pipeline
    assert compiling.runs_unhooked_on([pipe.text_encoder], CPU)
    assert not compiling.runs_unhooked_on([pipe.text_encoder], torch.device("cuda"))  # not where it would run
    from accelerate.hooks import ModelHook, add_hook_to_module

    add_hook_to_module(pipe.text_encoder.layers[0], ModelHook())
    assert not compiling.runs_unhooked_on([pipe.text_encoder], CPU)
    assert not compiling.runs_unhooked_on([], CPU)


def test_auto_never_compiles_on_a_cpu(tiny_checkpoint: Path, eager_compile: None) -> None:
    generator = Generator(settings=_settings(tiny_checkpoint), strategy="cpu")
    results = generator.generate_many([PROMPT] * 3, seed=1, **SIZE)
    assert not any(result.compiled for result in results)


# -- quantization -----------------------------------------------------------------------------------------


def test_the_quantized_layers_are_the_blocks_attention_and_feed_forward(tiny_checkpoint: Path) -> None:
    generator = Generator(settings=_settings(tiny_checkpoint), strategy="cpu").load()
    transformer = generator.pipeline.transformer
    names = quantize.quantized_linears(transformer)
    expected = set()
    for group in ("layers", "noise_refiner", "context_refiner"):
        for index, block in enumerate(getattr(transformer, group)):
            layers = {"attention.to_q": block.attention.to_q, "attention.to_k": block.attention.to_k}
            layers |= {"attention.to_v": block.attention.to_v, "attention.to_out.0": block.attention.to_out[0]}
            layers |= {f"feed_forward.{w}": getattr(block.feed_forward, w) for w in ("w1", "w2", "w3")}
            # fp8 matmuls need both sizes to be multiples of 16 (the tiny model's feed-forward is not)
            expected |= {
                f"{group}.{index}.{name}"
                for name, linear in layers.items()
                if linear.in_features % 16 == 0 and linear.out_features % 16 == 0
            }
    assert set(names) == expected and len(expected) >= 4 * 4


@pytest.mark.quant
def test_int8_swaps_quantized_weights_in_and_the_originals_back(tiny_checkpoint: Path) -> None:
    plain = Generator(settings=_settings(tiny_checkpoint), strategy="cpu")
    reference = plain.generate(PROMPT, seed=5, **SIZE).image
    generator = Generator(settings=_settings(tiny_checkpoint), strategy=FullGPU(device="cpu", quantize="int8"))
    quantized = generator.generate(PROMPT, seed=5, **SIZE)
    assert quantized.quantization == "int8" and quantized.strategy == "full_gpu"
    transformer = generator.pipeline.transformer
    weights = [linear.weight for linear in quantize.quantized_linears(transformer).values()]
    assert all(quantize.stored_bytes(weight) < weight.numel() * 2 for weight in weights)  # one byte, plus scales
    difference = np.abs(_pixels(quantized.image) - _pixels(reference))
    assert 0 < difference.max() <= 16  # it changes the image, a little
    # Back to an unquantized strategy: the very same original weights, so the very same image.
    generator.switch(CPUOnly())
    restored = generator.generate(PROMPT, seed=5, **SIZE)
    assert restored.quantization is None and same(restored.image, reference)
    assert all(type(linear.weight) is torch.nn.Parameter for linear in quantize.quantized_linears(transformer).values())


@pytest.mark.quant
def test_an_explicit_quantization_applies_to_strategies_named_not_to_instances(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # int8 is the only kind a CPU runs, and the CPU's only strategy has no quantized variant: name full_gpu and
    # hybrid on the CPU by giving their default device as "cpu".
    monkeypatch.setattr(FullGPU, "target", lambda self, hardware: CPU)
    monkeypatch.setattr(Hybrid, "target", lambda self, hardware: CPU)
    generator = Generator(settings=_settings(tiny_checkpoint, quantization="int8"), strategy="full_gpu")
    assert generator.generate(PROMPT, seed=5, **SIZE).quantization == "int8"
    generator.switch("hybrid")
    named = generator.generate(PROMPT, seed=5, **SIZE)
    assert named.strategy == "hybrid" and named.quantization == "int8"
    generator.switch(Hybrid())
    assert generator.generate(PROMPT, seed=5, **SIZE).quantization is None


def test_the_plan_shows_the_quantized_rungs_before_loading(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(zimage_turbo.machine, "detect_hardware", lambda **_: _card(12))
    monkeypatch.setattr(zimage_turbo.machine, "quantization_unavailable", lambda kind, device: "")
    monkeypatch.setattr(zimage_turbo.machine, "quantization_for", lambda device: "fp8")  # an Ada card
    generator = Generator(settings=_settings(tiny_checkpoint, quantization="auto"))
    names = [candidate.name for candidate in generator.plan().candidates]
    assert "full_gpu+fp8" in names and "hybrid+fp8" in names and not generator.is_loaded


@pytest.mark.quant
def test_hybrid_quantizes_its_resident_transformer(tiny_checkpoint: Path) -> None:
    generator = Generator(settings=_settings(tiny_checkpoint), strategy=Hybrid(device="cpu", quantize="int8"))
    result = generator.generate(PROMPT, seed=5, **SIZE)
    assert result.quantization == "int8" and result.strategy == "hybrid"


def test_fp8_on_a_cpu_is_refused_before_loading(tiny_checkpoint: Path) -> None:
    generator = Generator(settings=_settings(tiny_checkpoint, quantization="fp8"), strategy="cpu")
    with pytest.raises(InvalidSettingsError, match="fp8 needs a CUDA GPU"):
        generator.generate(PROMPT, seed=1, **SIZE)
    assert not generator.is_loaded
    with pytest.raises(InvalidSettingsError, match="quantize"):
        FullGPU(quantize="int4")
    for device in ("gpu0", 3.5):
        with pytest.raises(InvalidSettingsError, match="device must be like"):
            FullGPU(device=device)  # type: ignore[arg-type]


def test_quantization_without_torchao_is_refused_before_loading(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `pip install zimage-turbo` without the quant extra gives (make test-min-versions' first pass).
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *rest: None if name == "torchao" else find_spec(name, *rest)
    )
    generator = Generator(settings=_settings(tiny_checkpoint, quantization="int8"), strategy="cpu")
    with pytest.raises(InvalidSettingsError, match=r"quantization needs torchao: pip install 'zimage-turbo\[quant\]'"):
        generator.generate(PROMPT, seed=1, **SIZE)
    assert not generator.is_loaded
    with pytest.raises(StrategyUnavailableError, match="needs torchao"):
        quantize.quantized_weight(torch.ones(16, 16), "int8", CPU)
    # what the device cannot do is said first: installing torchao would not help
    assert quantize.quantization_unavailable("fp8", CPU) == "fp8 needs a CUDA GPU"


@pytest.mark.quant
def test_stored_bytes_counts_what_a_quantized_weight_really_holds() -> None:
    linear = torch.nn.Linear(64, 32, bias=False)
    assert quantize.stored_bytes(linear.weight) == 64 * 32 * 4
    quantized = quantize.quantized_weight(linear.weight, "int8", CPU)  # as the library quantizes
    assert type(quantized) not in (torch.Tensor, torch.nn.Parameter)  # a torchao subclass
    assert 64 * 32 <= quantize.stored_bytes(quantized) < 64 * 32 * 2


def _card(gib: float) -> Hardware:
    gpu = GPUInfo(0, "card", total_bytes=int(gib * GIB), free_bytes=int(gib * GIB), compute_capability=(8, 9))
    return Hardware(gpus=(gpu,), host_total_bytes=128 * GIB, host_available_bytes=120 * GIB)


def test_quantized_rungs_are_for_small_cards_unless_asked_for() -> None:
    profile = ModelProfile.z_image_turbo()
    # A 12 GiB card: bf16 hybrid does not fit; the fp8 transformer does, whole (hybrid+fp8, or partial+fp8 with
    # some of the text encoder resident too), and beats streaming part of the bf16 one at every pass.
    small = plan(profile, _card(12), quantize="fp8")
    assert small.best is not None and small.best.strategy.quantize == "fp8"
    assert small.best.name == "hybrid+fp8" or getattr(small.best.strategy, "transformer_blocks", 0) == 34
    assert plan(profile, _card(12)).best.strategy.name == "partial"  # type: ignore[union-attr]
    # A big card: lossless full_gpu first, though fp8 fits too (and, compiled, is faster)...
    big = plan(profile, _card(80), quantize="fp8")
    assert big.best is not None and big.best.name == "full_gpu"
    fp8 = next(c for c in big.candidates if c.name == "full_gpu+fp8")
    assert fp8.fits and big.candidates.index(fp8) > big.candidates.index(big.best)
    # ...unless quantization was asked for outright.
    asked = plan(profile, _card(80), quantize="fp8", prefer_lossless=False)
    assert asked.best is not None and asked.best.name == "full_gpu+fp8"
    # fp8 weights take about half the transformer's bytes
    assert fp8.peak_bytes < big.best.peak_bytes - 5 * GIB


def test_the_first_compiled_run_after_the_compile_measures_the_saving_once(tmp_path: Path) -> None:
    """The driver records the compile's cost from the image that compiled, and the saving from the next one,
    against what that run would have taken eagerly (the planner's prediction scaled by the measured eager
    rate)."""
    driver = SpeedupDriver("native", "auto", tmp_path)
    blocks = compiling.COMPILE_PARTS[0]
    advisor = driver._advisor(blocks, CPU, torch.bfloat16, None)
    driver.finished(None, {"denoise": 1.2}, {"denoise": 1.0})  # eager: 1.2 times the prediction
    driver._compiled.add(blocks.name)  # as prepare() does when it compiles
    driver._compiling[blocks.name] = advisor
    driver.finished(None, {"denoise": 6.0}, {"denoise": 1.0})
    assert advisor.expected_compile_s == pytest.approx(6.0 - 1.2 * (1 - compiling.COMPILE_SAVING))
    driver.finished(None, {"denoise": 0.6}, {"denoise": 1.0})
    assert advisor.saving == pytest.approx(0.5)
    driver.finished(None, {"denoise": 0.9}, {"denoise": 1.0})  # measured once
    assert advisor.saving == pytest.approx(0.5)
    records = json.loads((tmp_path / "zimage-turbo-compile-times.json").read_text())
    assert records[advisor.device_key + " / saving"] == 0.5
