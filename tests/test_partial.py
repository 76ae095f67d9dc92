"""The ``partial`` placement on the CPU, with the tiny checkpoint: the image, which blocks stream, switches on the
same weights, quantized blocks, the compiler's view, and the ladder halving the resident blocks.

On the CPU the hooks run but copy nothing (the "device" is the host, and there is no transfer stream to prefetch
on): these tests check the placement's bookkeeping and that the image is bit for bit full_gpu's; the GPU suite
(tests/gpu/test_gpu_partial.py) checks the copies and the prefetching.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

import zimage_turbo.placement as placement_module
from test_generator import plain_diffusers, same
from test_streaming_homes import _listed, at_home
from zimage_turbo import CPUOnly, FullGPU, Generator, PartialOffload, StreamedOffload, ZImageSettings
from zimage_turbo.flat_quantized import FlatQuantizedLinear, flattened_tensors
from zimage_turbo.profile import ModelProfile
from zimage_turbo.quantize import quantized_linears
from zimage_turbo.speedups import compile as compiling
from zimage_turbo.strategies.base import components, host_homes
from zimage_turbo.strategies.partial_streaming import link_prefetch
from zimage_turbo.strategies.residency import Residency
from zimage_turbo.strategies.streaming import other_tensors

PROMPT = "a red fox in fresh snow at dawn"
SIZE = {"height": 256, "width": 256, "steps": 2}


def generator(checkpoint: Path, strategy: Any) -> Generator:
    return Generator(model=checkpoint, strategy=strategy, settings=ZImageSettings(progress=False))


def partial(transformer: int, text_encoder: int, **options: Any) -> PartialOffload:
    return PartialOffload(device="cpu", transformer_blocks=transformer, text_encoder_blocks=text_encoder, **options)


def hooked_blocks(module: torch.nn.Module, names: tuple[str, ...]) -> set[str]:
    """The blocks of ``module`` (by name) that carry a diffusers hook."""
    found = set()
    for name in names:
        registry = getattr(module.get_submodule(name), "_diffusers_hook", None)
        if registry is not None and registry.hooks:
            found.add(name)
    return found


def has_hooks(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and bool(registry.hooks)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Image.Image:
    [image] = plain_diffusers(tiny_checkpoint, PROMPT, seeds=[5], **SIZE)
    return image


def test_partial_gives_full_gpus_image_and_hooks_only_the_streamed_blocks(
    tiny_checkpoint: Path, reference: Image.Image
) -> None:
    full = generator(tiny_checkpoint, FullGPU(device="cpu")).generate(PROMPT, seed=5, **SIZE)
    gen = generator(tiny_checkpoint, partial(2, 1))
    result = gen.generate(PROMPT, seed=5, **SIZE)
    assert result.strategy == "partial" and result.fallbacks == ()
    assert same(result.image, full.image) and same(result.image, reference)
    pipe = gen.pipeline
    profile = ModelProfile.from_modules(components(pipe))
    transformer, text = profile.transformer, profile.text_encoder
    assert transformer.block_names == ("noise_refiner.0", "context_refiner.0", "layers.0", "layers.1")
    # two of four stay: the streamed ones are spread out, the last one among them, the first one not
    assert hooked_blocks(pipe.transformer, transformer.block_names) == {"context_refiner.0", "layers.1"}
    assert hooked_blocks(pipe.text_encoder, text.block_names) == {"layers.1"}
    # each module's own hook starts the first streamed block's copy; the VAE is resident, unhooked
    assert has_hooks(pipe.transformer) and has_hooks(pipe.text_encoder) and not has_hooks(pipe.vae)
    # the same image again, from the same placement
    assert same(gen.generate(PROMPT, seed=5, **SIZE).image, reference)


@pytest.mark.parametrize(("text_encoder_blocks", "copies"), [(0, 1), (1, 0)])
def test_the_text_encoders_embedding_moves_through_its_home_only_when_none_of_its_blocks_stays(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, text_encoder_blocks: int, copies: int
) -> None:
    gen = generator(tiny_checkpoint, partial(4, text_encoder_blocks))
    gen.load()
    homes = host_homes(gen.pipeline)
    others = other_tensors(gen.pipeline.text_encoder)
    ids = frozenset(map(id, others))
    sent: list[frozenset[int]] = []
    send_to = homes.send_to

    def recording_send_to(what: Any, device: torch.device) -> None:
        tensors = _listed(what)
        sent.append(frozenset(map(id, tensors)))
        send_to(tensors, device)

    monkeypatch.setattr(homes, "send_to", recording_send_to)
    for prompts in (1, 2):
        gen.generate(PROMPT, seed=5, **SIZE)
        assert sent.count(ids) == copies * prompts  # once per prompt, or never when it stays resident
    if copies:
        assert at_home(homes, others)  # pointed back home after each prompt


def test_switches_to_and_from_partial_move_the_loaded_weights_without_reading_them_again(
    tiny_checkpoint: Path, reference: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = generator(tiny_checkpoint, CPUOnly())
    gen.load()
    pipe, homes = gen.pipeline, host_homes(gen.pipeline)
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    def no_second_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were read from disk again")

    monkeypatch.setattr(placement_module, "load_pipeline", no_second_load)
    for strategy in (partial(2, 1), StreamedOffload(device="cpu"), partial(0, 0), FullGPU(device="cpu"), partial(4, 2)):
        gen.switch(strategy)
        result = gen.generate(PROMPT, seed=5, **SIZE)
        assert gen.strategy == strategy and same(result.image, reference), strategy
    gen.switch(CPUOnly())
    assert gen.pipeline is pipe and host_homes(pipe) is homes
    for name in ("transformer", "text_encoder", "vae"):
        assert not any(has_hooks(module) for module in getattr(pipe, name).modules()), name
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, original[key]), key


@pytest.mark.quant
def test_partial_int8_gives_the_resident_int8_image_and_a_switch_back_drops_the_quantized_copies(
    tiny_checkpoint: Path,
) -> None:
    resident = generator(tiny_checkpoint, FullGPU(device="cpu", quantize="int8")).generate(PROMPT, seed=5, **SIZE)
    gen = generator(tiny_checkpoint, partial(2, 0, quantize="int8"))
    result = gen.generate(PROMPT, seed=5, **SIZE)
    assert result.strategy == "partial" and result.quantization == "int8"
    assert same(result.image, resident.image)  # the same quantized weights, whether resident or streamed
    transformer = gen.pipeline.transformer
    flat = {name for name, module in transformer.named_modules() if isinstance(module, FlatQuantizedLinear)}
    # streamed blocks hold flat layers with homes of their own; resident ones torchao's quantized weights
    assert flat and all(name.startswith(("context_refiner.0.", "layers.1.")) for name in flat)
    kept = quantized_linears(transformer)
    assert kept and all(not name.startswith(("context_refiner.0.", "layers.1.")) for name in kept)
    assert all(type(linear.weight) is not torch.nn.Parameter for linear in kept.values())
    blocks = next(part for part in compiling.COMPILE_PARTS if part.name == "blocks")
    assert blocks.inside(gen.pipeline) == []  # flat layers compile on their own path (the "fp8_linears" part)
    homes = host_homes(gen.pipeline)
    copies = flattened_tensors(transformer)
    assert homes.has_home(copies)

    gen.switch(CPUOnly())
    plain = generator(tiny_checkpoint, "cpu").generate(PROMPT, seed=5, **SIZE)
    assert same(gen.generate(PROMPT, seed=5, **SIZE).image, plain.image)
    assert not flattened_tensors(transformer) and not any(homes.has_home([t]) for t in copies)
    assert all(type(linear.weight) is torch.nn.Parameter for linear in quantized_linears(transformer).values())


@pytest.mark.quant
def test_quantizing_resident_layers_is_all_or_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A card that fills up half-way through leaves no quantized copy that nothing knows about."""
    from zimage_turbo import quantize

    block = torch.nn.Module()
    block.attention = torch.nn.Module()
    for name in ("to_q", "to_k", "to_v"):
        setattr(block.attention, name, torch.nn.Linear(32, 32, bias=False))
    transformer = torch.nn.Module()
    transformer.layers = torch.nn.ModuleList([block, copy.deepcopy(block)])
    weights = {name: linear.weight for name, linear in quantized_linears(transformer).items()}
    assert len(weights) == 6 and set(quantized_linears(transformer, ["layers.1"])) == {
        f"layers.1.attention.{name}" for name in ("to_q", "to_k", "to_v")
    }
    made: list[int] = []
    real = quantize.quantized_weight

    def filling_up(weight: torch.Tensor, kind: quantize.QuantizationName, device: torch.device) -> torch.Tensor:
        if len(made) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        made.append(1)
        return real(weight, kind, device)

    monkeypatch.setattr(quantize, "quantized_weight", filling_up)
    with pytest.raises(torch.OutOfMemoryError):
        quantize.quantize_linears(transformer, "int8", torch.device("cpu"))
    assert {name: linear.weight for name, linear in quantized_linears(transformer).items()} == weights
    made.clear()
    originals = quantize.quantize_linears(transformer, "int8", torch.device("cpu"), ["layers.1"])
    assert set(originals) == {f"layers.1.attention.{name}" for name in ("to_q", "to_k", "to_v")}
    assert all(linear.weight is weights[name] for name, linear in quantized_linears(transformer, ["layers.0"]).items())


def test_the_compiler_is_offered_only_the_resident_blocks(tiny_checkpoint: Path) -> None:
    gen = generator(tiny_checkpoint, partial(2, 1))
    gen.load()
    pipe = gen.pipeline
    blocks = next(part for part in compiling.COMPILE_PARTS if part.name == "blocks")
    assert blocks.every is not None
    resident = {id(pipe.transformer.get_submodule(name)) for name in ("noise_refiner.0", "layers.0")}
    assert {id(module) for module in blocks.modules(pipe)} == resident
    assert compiling.runs_unhooked_on(blocks.modules(pipe), torch.device("cpu"))
    # Blocks compiled under a placement that kept them resident go back to eager once a new one streams them.
    every = blocks.every(pipe)
    for module in every:
        module._compiled_call_impl = module._call_impl
    compiling.uncompile_hooked(pipe, blocks)
    assert {id(m) for m in every if m._compiled_call_impl is not None} == resident
    gen.switch(StreamedOffload(device="cpu"))
    assert blocks.modules(pipe) == [] and not compiling.runs_unhooked_on(blocks.modules(pipe), torch.device("cpu"))
    compiling.uncompile_part(pipe, blocks)
    assert all(module._compiled_call_impl is None for module in every)


def test_streamed_blocks_compute_compiled_beneath_their_hooks(
    tiny_checkpoint: Path, reference: Image.Image, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """compile="on": the resident blocks compile whole; in the streamed ones (their hooks move the weights) the
    attention, feed-forward and norms compile, one graph per class for every block; the image is the eager one.
    Once a placement keeps every block resident, they compile whole and no inside stays compiled."""
    from torch._dynamo.testing import CompileCounter

    from zimage_turbo.speedups.block_insides import insides_compiled

    counter = CompileCounter()  # traces with Dynamo, runs the graphs as captured
    monkeypatch.setitem(compiling.COMPILE_OPTIONS, "backend", counter)
    torch._dynamo.reset()
    try:
        settings = ZImageSettings(progress=False, compile="on", cache_dir=tmp_path)
        gen = Generator(model=tiny_checkpoint, strategy=partial(2, 1), settings=settings)
        first = gen.generate(PROMPT, seed=5, **SIZE)
        pipe = gen.pipeline
        blocks = next(part for part in compiling.COMPILE_PARTS if part.name == "blocks")
        assert blocks.every is not None
        streamed = [block for block in blocks.every(pipe) if all(block is not kept for kept in blocks.modules(pipe))]
        insides = blocks.inside(pipe)
        assert streamed and {id(block.attention) for block in streamed} <= {id(module) for module in insides}
        assert {id(block.feed_forward) for block in streamed} <= {id(module) for module in insides}
        assert {type(module).__name__ for module in insides} == {"Attention", "FeedForward", "RMSNorm"}
        assert all(insides_compiled(module) for module in insides)
        assert first.compiled == ("blocks",) and same(first.image, reference)
        # the resident blocks' graphs (with and without modulation) and one per class inside streamed blocks
        graphs = counter.frame_count
        assert graphs >= 4
        assert same(gen.generate(PROMPT, seed=5, **SIZE).image, reference) and counter.frame_count == graphs

        gen.switch(CPUOnly())
        resident = gen.generate(PROMPT, seed=5, **SIZE)
        assert resident.compiled == ("blocks",) and same(resident.image, reference)
        assert not any(insides_compiled(module) for module in blocks.inside(pipe, hooked_only=False))
        assert all(block._compiled_call_impl is not None for block in blocks.every(pipe))
    finally:
        torch._dynamo.reset()


def test_prefetch_links_each_streamed_block_to_the_next_from_the_modules_own_hook() -> None:
    first = SimpleNamespace(next_group=None)
    hooks = [SimpleNamespace(next_group=None, group=SimpleNamespace(onload_self=True)) for _ in range(3)]
    link_prefetch(first, hooks)
    assert first.next_group is hooks[0].group
    assert [hook.next_group for hook in hooks] == [hooks[1].group, hooks[2].group, None]
    assert not any(hook.group.onload_self for hook in hooks)  # each waits for the copy its predecessor started


# -- the ladder --------------------------------------------------------------------------------------------


@pytest.fixture
def inject() -> Iterator[Callable[[torch.nn.Module, Callable[[], bool]], None]]:
    handles: list[Any] = []

    def install(module: torch.nn.Module, when: Callable[[], bool]) -> None:
        def hook(*_: Any) -> None:
            if when():
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        handles.append(module.register_forward_pre_hook(hook))

    yield install
    for handle in handles:
        handle.remove()


def resident_now(gen: Generator) -> Residency | None:
    strategy = gen.strategy
    return strategy.residency if isinstance(strategy, PartialOffload) else None


def test_running_out_of_memory_halves_the_resident_blocks_before_another_strategy(
    tiny_checkpoint: Path, reference: Image.Image, inject: Callable[..., None]
) -> None:
    gen = generator(tiny_checkpoint, partial(4, 2))
    gen.load()
    # pretend that more than one resident transformer block does not leave room to denoise
    inject(gen.pipeline.transformer, lambda: (resident_now(gen) or Residency(0, 0)).transformer > 1)
    result = gen.generate(PROMPT, seed=5, **SIZE)
    steps = [(f.kind, f.before, f.after, f.phase) for f in result.fallbacks]
    assert steps == [
        ("strategy", "partial(4,2)", "partial(2,2)", "denoise"),
        ("strategy", "partial(2,2)", "partial(1,2)", "denoise"),
    ]
    assert all("injected" in f.reason for f in result.fallbacks)
    assert result.strategy == "partial" and resident_now(gen) == Residency(1, 2)
    assert same(result.image, reference)  # the same noise and weights: the same image
    again = gen.generate(PROMPT, seed=5, **SIZE)
    assert again.fallbacks == () and resident_now(gen) == Residency(1, 2)  # the smaller placement stays


def test_an_encode_that_runs_out_halves_the_text_encoders_blocks_then_the_ladder_moves_on(
    tiny_checkpoint: Path, reference: Image.Image, inject: Callable[..., None]
) -> None:
    gen = generator(tiny_checkpoint, partial(2, 2))
    gen.load()
    inject(gen.pipeline.text_encoder, lambda: isinstance(gen.strategy, PartialOffload))
    result = gen.generate(PROMPT, seed=5, **SIZE)
    steps = [(f.before, f.after, f.phase) for f in result.fallbacks]
    assert steps == [
        ("partial(2,2)", "partial(2,1)", "encode"),  # the text encoder's blocks first
        ("partial(2,1)", "partial(2,0)", "encode"),
        ("partial(2,0)", "partial(1,0)", "encode"),  # then the transformer's, which also sit on the card
        ("partial(1,0)", "partial(0,0)", "encode"),
        ("partial(0,0)", "", "encode"),  # nothing resident left: the next strategy takes over
    ]
    assert result.strategy == "cpu" and same(result.image, reference)


def test_weights_that_do_not_fit_when_first_placed_are_halved_until_they_do(
    tiny_checkpoint: Path, reference: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply = PartialOffload.apply

    def filling_up(self: PartialOffload, pipe: Any, hardware: Any) -> None:
        apply(self, pipe, hardware)
        if self.transformer_blocks is not None and self.transformer_blocks > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected while placing)")

    monkeypatch.setattr(PartialOffload, "apply", filling_up)
    gen = generator(tiny_checkpoint, partial(4, 2))
    gen.load()  # placed right after loading: the halving happens there already
    assert resident_now(gen) == Residency(1, 0)
    result = gen.generate(PROMPT, seed=5, **SIZE)
    assert [(f.before, f.after, f.phase) for f in result.fallbacks] == [
        ("partial(4,2)", "partial(2,1)", "place"),
        ("partial(2,1)", "partial(1,0)", "place"),
    ]
    assert result.strategy == "partial" and same(result.image, reference)


def test_every_tensor_outside_the_streamed_blocks_stays_on_the_card() -> None:
    """The caption embedder is a Sequential child: neither a streamed block nor one of streaming's "other"
    tensors. It was left in host memory once, which only a GPU shows (the CPU is both places)."""
    from diffusers import ZImageTransformer2DModel

    from zimage_turbo.model import PRESETS
    from zimage_turbo.strategies.partial import _not_streamed

    transformer = ZImageTransformer2DModel(**PRESETS["tiny"].transformer)
    streamed = [transformer.layers[0], transformer.noise_refiner[0]]
    staying = {id(t) for t in _not_streamed(transformer, streamed)}
    moving = {id(t) for block in streamed for t in block.parameters()}
    assert staying.isdisjoint(moving)
    assert staying | moving == {id(t) for t in (*transformer.parameters(), *transformer.buffers())}
    assert {id(t) for t in transformer.cap_embedder.parameters()} <= staying
