"""LoRA on the tiny checkpoint: each layout diffusers reads gives diffusers' image, under every placement that
runs on a CPU and after switches; unloading gives the base image bit for bit; bad input changes nothing."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from zimage_turbo import (
    FullGPU,
    Generator,
    Hybrid,
    LoraError,
    LoraNotFoundError,
    ModelCPUOffload,
    PartialOffload,
    SequentialOffload,
    StreamedOffload,
    ZImageSettings,
    read_metadata,
)

SIZE: dict[str, Any] = {"height": 256, "width": 256, "steps": 2}
PROMPT = "a lighthouse in a storm"
SEED = 11
RANK = 4


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and bool(np.array_equal(np.asarray(a), np.asarray(b)))


def close(a: Image.Image, b: Image.Image, *, levels: int = 2, share: float = 0.01) -> bool:
    """Equal up to float rounding: a few pixels a level or two apart."""
    x, y = np.asarray(a).astype(int), np.asarray(b).astype(int)
    return bool(np.abs(x - y).max() <= levels and (x != y).mean() < share)


def linear_shapes(checkpoint: Path, component: str = "transformer") -> dict[str, tuple[int, int]]:
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Model

    if component == "transformer":
        module: torch.nn.Module = ZImageTransformer2DModel.from_pretrained(checkpoint / "transformer")
    else:
        module = Qwen3Model.from_pretrained(checkpoint / "text_encoder")
    return {
        name: (m.out_features, m.in_features) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)
    }


def lora_tensors(
    shapes: dict[str, tuple[int, int]], layout: str, *, seed: int, alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA on every attention and feed-forward layer, keyed in ``layout``."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (out_features, in_features) in shapes.items():
        if "attention" not in name and "feed_forward" not in name and "self_attn" not in name:
            continue
        down = torch.randn(RANK, in_features, generator=generator) * 0.3
        up = torch.randn(out_features, RANK, generator=generator) * 0.3
        if layout == "diffusers":
            key, down_key, up_key = f"transformer.{name}", "lora_A.weight", "lora_B.weight"
        elif layout == "kohya":
            key, down_key, up_key = "lora_unet_" + name.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        elif layout == "comfyui":
            key, down_key, up_key = f"diffusion_model.{name}", "lora_down.weight", "lora_up.weight"
        elif layout == "text_encoder":
            key, down_key, up_key = f"text_encoder.{name}", "lora_A.weight", "lora_B.weight"
        else:
            raise AssertionError(layout)
        tensors[f"{key}.{down_key}"] = down
        tensors[f"{key}.{up_key}"] = up
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


@pytest.fixture(scope="module")
def shapes(tiny_checkpoint: Path) -> dict[str, tuple[int, int]]:
    return linear_shapes(tiny_checkpoint)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, shapes: dict[str, tuple[int, int]]) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    made = {
        "diffusers": lora_tensors(shapes, "diffusers", seed=1),
        "kohya": lora_tensors(shapes, "kohya", seed=2, alpha=8.0),
        "comfyui": lora_tensors(shapes, "comfyui", seed=3, alpha=2.0),
        "second": lora_tensors(shapes, "diffusers", seed=4),
    }
    paths = {}
    for name, tensors in made.items():
        paths[name] = folder / f"{name}.safetensors"
        save_file(tensors, paths[name])
    return paths


@pytest.fixture(scope="module")
def generator(tiny_checkpoint: Path) -> Iterator[Generator]:
    with Generator(settings=ZImageSettings(model=str(tiny_checkpoint), progress=False), strategy="cpu") as gen:
        yield gen


@pytest.fixture(scope="module")
def base(generator: Generator) -> Image.Image:
    assert generator.loras == {}
    return generator.generate(PROMPT, seed=SEED, **SIZE).image


@pytest.fixture(autouse=True)
def no_lora_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "generator" in request.fixturenames:
        request.getfixturevalue("generator").unload_lora()


def diffusers_image(checkpoint: Path, loras: dict[Path, float], *, fuse: bool) -> Image.Image:
    """diffusers' own LoRA loading: load_lora_weights + set_adapters (+ fuse_lora)."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for index, path in enumerate(loras):
        names.append(f"adapter{index}")
        pipe.load_lora_weights(str(path), adapter_name=names[-1])
    pipe.set_adapters(names, list(loras.values()))
    if fuse:
        pipe.fuse_lora(adapter_names=names)
    output = pipe(
        PROMPT,
        height=SIZE["height"],
        width=SIZE["width"],
        num_inference_steps=SIZE["steps"],
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(SEED),
    )
    return output.images[0]


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "comfyui"])
def test_each_layout_gives_diffusers_image(
    generator: Generator, base: Image.Image, files: dict[str, Path], tiny_checkpoint: Path, layout: str
) -> None:
    name = generator.load_lora(files[layout], scale=0.7)
    assert name == layout and generator.loras == {layout: 0.7}
    result = generator.generate(PROMPT, seed=SEED, **SIZE)
    assert result.loras == {layout: 0.7}
    assert not close(result.image, base)  # the LoRA changes the image: the comparisons below have teeth
    # fused like diffusers' fuse_lora: the same float32 sums, so bit for bit on the CPU
    assert same(result.image, diffusers_image(tiny_checkpoint, {files[layout]: 0.7}, fuse=True))
    # unfused (the LoRA computed beside each layer) rounds differently: close, not equal
    assert close(result.image, diffusers_image(tiny_checkpoint, {files[layout]: 0.7}, fuse=False))


def test_stacked_loras_and_scales_match_diffusers_and_unload_restores_bit_for_bit(
    generator: Generator, base: Image.Image, files: dict[str, Path], tiny_checkpoint: Path
) -> None:
    generator.load_lora(files["diffusers"], scale=0.5)
    generator.load_lora(files["second"], scale=1.0, name="other")
    generator.set_lora_scale("other", -0.4)
    assert generator.loras == {"diffusers": 0.5, "other": -0.4}
    stacked = generator.generate(PROMPT, seed=SEED, **SIZE)
    expected = diffusers_image(tiny_checkpoint, {files["diffusers"]: 0.5, files["second"]: -0.4}, fuse=True)
    assert same(stacked.image, expected)
    generator.unload_lora("other")
    alone = generator.generate(PROMPT, seed=SEED, **SIZE).image
    assert same(alone, diffusers_image(tiny_checkpoint, {files["diffusers"]: 0.5}, fuse=True))
    generator.set_lora_scale("diffusers", 0.0)  # out of the weights, still loaded
    assert generator.loras == {"diffusers": 0.0}
    assert same(generator.generate(PROMPT, seed=SEED, **SIZE).image, base)
    generator.set_lora_scale("diffusers", 0.5)
    assert same(generator.generate(PROMPT, seed=SEED, **SIZE).image, alone)
    generator.unload_lora()
    assert generator.loras == {}
    assert same(generator.generate(PROMPT, seed=SEED, **SIZE).image, base)


PLACEMENTS: dict[str, Callable[[], Any]] = {
    "full_gpu": lambda: FullGPU(device="cpu"),
    "hybrid": lambda: Hybrid(device="cpu"),
    "model_offload": lambda: ModelCPUOffload(device="cpu"),
    "streamed": lambda: StreamedOffload(device="cpu"),
    "sequential_offload": lambda: SequentialOffload(device="cpu"),
    "partial": lambda: PartialOffload(device="cpu", transformer_blocks=1, text_encoder_blocks=1),
}


def test_every_placement_and_switch_keeps_the_lora(
    tiny_checkpoint: Path, files: dict[str, Path], generator: Generator
) -> None:
    generator.load_lora(files["kohya"], scale=0.9)
    reference = generator.generate(PROMPT, seed=SEED, **SIZE).image  # the cpu strategy
    settings = ZImageSettings(model=str(tiny_checkpoint), progress=False)
    with Generator(settings=settings, strategy=FullGPU(device="cpu")) as gen:
        plain = gen.generate(PROMPT, seed=SEED, **SIZE).image
        gen.load_lora(files["kohya"], scale=0.9)
        for name, make in PLACEMENTS.items():
            gen.switch(make())
            result = gen.generate(PROMPT, seed=SEED, **SIZE)
            assert result.loras == {"kohya": 0.9}, name
            assert same(result.image, reference), name
        gen.unload_lora()  # under the last placement (sequential offload): the homes get the base back
        for name, make in PLACEMENTS.items():
            gen.switch(make())
            assert same(gen.generate(PROMPT, seed=SEED, **SIZE).image, plain), name


@pytest.mark.quant
def test_quantized_placement_fuses_first_then_quantizes(tiny_checkpoint: Path, files: dict[str, Path]) -> None:
    settings = ZImageSettings(model=str(tiny_checkpoint), progress=False)
    with Generator(settings=settings, strategy=FullGPU(device="cpu", quantize="int8")) as gen:
        plain = gen.generate(PROMPT, seed=SEED, **SIZE)
        assert plain.quantization == "int8"
        gen.load_lora(files["diffusers"], scale=0.8)
        assert gen.strategy == FullGPU(device="cpu", quantize="int8")  # applied again, on the fused weights
        fused = gen.generate(PROMPT, seed=SEED, **SIZE)
        assert fused.quantization == "int8" and fused.loras == {"diffusers": 0.8}
        # the same as quantizing weights that had the LoRA fused in before: switch away and back
        gen.switch(FullGPU(device="cpu"))
        gen.switch(FullGPU(device="cpu", quantize="int8"))
        assert same(gen.generate(PROMPT, seed=SEED, **SIZE).image, fused.image)
        assert not close(fused.image, plain.image)
        gen.unload_lora()
        assert same(gen.generate(PROMPT, seed=SEED, **SIZE).image, plain.image)


def test_text_encoder_layers_are_fused_too(
    tiny_checkpoint: Path, tmp_path: Path, generator: Generator, base: Image.Image
) -> None:
    shapes = linear_shapes(tiny_checkpoint, "text_encoder")
    tensors = lora_tensors(shapes, "text_encoder", seed=5)
    path = tmp_path / "te.safetensors"
    save_file(tensors, path)
    generator.load_lora(path, scale=1.5)
    ours = generator.generate(PROMPT, seed=SEED, **SIZE).image
    assert not close(ours, base)
    # by hand: the same sums written into a plain diffusers pipeline's text encoder
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for name in shapes:
            key = f"text_encoder.{name}"
            if f"{key}.lora_A.weight" not in tensors:
                continue
            layer = pipe.text_encoder.get_submodule(name)
            delta = (tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]) * 1.5
            layer.weight += delta
    theirs = pipe(
        PROMPT,
        height=SIZE["height"],
        width=SIZE["width"],
        num_inference_steps=SIZE["steps"],
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(SEED),
    ).images[0]
    assert same(ours, theirs)


def test_metadata_scale_is_applied_as_diffusers_does(
    tiny_checkpoint: Path, tmp_path: Path, shapes: dict[str, tuple[int, int]], generator: Generator
) -> None:
    """diffusers' save_lora_weights stores lora_alpha and r in the file's metadata; alpha / r scales the LoRA."""
    path = tmp_path / "with_alpha.safetensors"
    tensors = lora_tensors(shapes, "diffusers", seed=6)
    targets = sorted({key.removeprefix("transformer.").rsplit(".", 2)[0] for key in tensors})
    config = {"transformer.r": RANK, "transformer.lora_alpha": 2, "transformer.target_modules": targets}
    save_file(tensors, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    generator.load_lora(path)
    ours = generator.generate(PROMPT, seed=SEED, **SIZE).image
    assert same(ours, diffusers_image(tiny_checkpoint, {path: 1.0}, fuse=True))


def test_result_and_saved_image_record_the_loras(generator: Generator, files: dict[str, Path], tmp_path: Path) -> None:
    generator.load_lora(files["diffusers"], scale=0.25, name="ink wash")
    result = generator.generate(PROMPT, seed=SEED, **SIZE)
    [saved] = result.save(tmp_path / "out.png")
    metadata = read_metadata(saved)
    assert metadata is not None and metadata["loras"] == {"ink wash": 0.25}
    assert 'LoRAs: "ink wash: 0.25"' in Image.open(saved).info["parameters"]


# -- bad input: a typed error naming the file, and nothing changed ----------------------------------------------


def bad_files(shapes: dict[str, tuple[int, int]], folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its error must contain)."""
    good = lora_tensors(shapes, "diffusers", seed=7)
    cases: dict[str, tuple[dict[str, torch.Tensor], str]] = {
        "other_model": (
            {
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 320),
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(320, 4),
            },
            "another model",
        ),
        "some_unknown": (
            {
                **good,
                "transformer.layers.7.attention.to_q.lora_A.weight": torch.ones(RANK, 64),
                "transformer.layers.7.attention.to_q.lora_B.weight": torch.ones(64, RANK),
            },
            "layers.7.attention.to_q",
        ),
        "shape": (
            {
                "transformer.layers.0.attention.to_q.lora_A.weight": torch.ones(RANK, 48),
                "transformer.layers.0.attention.to_q.lora_B.weight": torch.ones(64, RANK),
            },
            "another size",
        ),
        "rank": (
            {
                "transformer.layers.0.attention.to_q.lora_A.weight": torch.ones(RANK, 64),
                "transformer.layers.0.attention.to_q.lora_B.weight": torch.ones(64, RANK + 1),
            },
            "ranks differ",
        ),
        "unpaired": ({"transformer.layers.0.attention.to_q.lora_A.weight": torch.ones(RANK, 64)}, "one of their"),
        "nan": ({**good, next(iter(good)): torch.full_like(next(iter(good.values())), math.nan)}, "non-finite"),
        "lokr": ({"transformer.layers.0.attention.to_q.lokr_w1": torch.ones(2, 2)}, "LoKr"),
        "empty": ({}, "no tensors"),
    }
    made = {}
    for name, (tensors, phrase) in cases.items():
        path = folder / f"{name}.safetensors"
        save_file(tensors, path)
        made[name] = (path, phrase)
    pickle = folder / "old.bin"
    torch.save(good, pickle)
    made["pickle"] = (pickle, "pickle")
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes((folder / "shape.safetensors").read_bytes()[:-7])
    made["truncated"] = (truncated, "truncated.safetensors")
    return made


def test_bad_files_are_refused_naming_the_file_with_nothing_changed(
    generator: Generator, base: Image.Image, files: dict[str, Path], shapes: dict[str, tuple[int, int]], tmp_path: Path
) -> None:
    generator.load_lora(files["diffusers"], scale=0.6)
    with_lora = generator.generate(PROMPT, seed=SEED, **SIZE).image
    for name, (path, phrase) in bad_files(shapes, tmp_path).items():
        with pytest.raises(LoraError) as caught:
            generator.load_lora(path)
        assert phrase in str(caught.value), (name, str(caught.value))
        assert path.name in str(caught.value), name
        assert generator.loras == {"diffusers": 0.6}, name
    assert same(generator.generate(PROMPT, seed=SEED, **SIZE).image, with_lora)
    generator.unload_lora()
    assert same(generator.generate(PROMPT, seed=SEED, **SIZE).image, base)


@pytest.mark.parametrize("scale", [math.nan, math.inf, "0.5", True, None])
def test_bad_scales_are_refused(generator: Generator, files: dict[str, Path], scale: Any) -> None:
    with pytest.raises(LoraError, match="finite number"):
        generator.load_lora(files["diffusers"], scale=scale)
    generator.load_lora(files["diffusers"])
    with pytest.raises(LoraError, match="finite number"):
        generator.set_lora_scale("diffusers", scale)
    assert generator.loras == {"diffusers": 1.0}


def test_names_sources_and_folders(generator: Generator, files: dict[str, Path], tmp_path: Path) -> None:
    generator.load_lora(files["diffusers"])
    with pytest.raises(LoraError, match="loaded already"):
        generator.load_lora(files["diffusers"])
    for call in (lambda: generator.set_lora_scale("nope", 1.0), lambda: generator.unload_lora("nope")):
        with pytest.raises(LoraError, match="no LoRA named 'nope'"):
            call()
    with pytest.raises(LoraError, match="name"):
        generator.load_lora(files["second"], name=" ")
    with pytest.raises(LoraNotFoundError):
        generator.load_lora(tmp_path / "absent.safetensors")
    with pytest.raises(LoraNotFoundError, match="not found"):
        generator.load_lora("someone/not-cached-lora")  # clean environment, offline tests: nothing cached
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(files["second"].read_bytes())
    assert generator.load_lora(folder) == "a"  # the only file
    (folder / "b.safetensors").write_bytes(files["second"].read_bytes())
    with pytest.raises(LoraError, match="weight_name"):
        generator.load_lora(folder, name="b")
    assert generator.load_lora(folder, weight_name="b.safetensors") == "b"
    assert list(generator.loras) == ["diffusers", "a", "b"]


def test_a_repo_id_resolves_from_the_hugging_face_cache_offline(
    tiny_checkpoint: Path, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hub_caches import huggingface_cache

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pytorch_lora_weights.safetensors").write_bytes(files["diffusers"].read_bytes())
    (repo / "sample.png").write_bytes(b"not needed")
    huggingface_cache(repo, tmp_path / "hf" / "hub", "someone/style-lora")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    settings = ZImageSettings(model=str(tiny_checkpoint), progress=False, offline=True)
    with Generator(settings=settings, strategy="cpu") as gen:
        assert gen.load_lora("someone/style-lora", scale=0.7) == "pytorch_lora_weights"
        result = gen.generate(PROMPT, seed=SEED, **SIZE)
    assert result.loras == {"pytorch_lora_weights": 0.7}


def test_unload_before_loading_the_model_loads_nothing(tiny_checkpoint: Path) -> None:
    gen = Generator(settings=ZImageSettings(model=str(tiny_checkpoint), progress=False))
    gen.unload_lora()
    assert not gen.is_loaded and gen.loras == {}


def test_a_pool_applies_loras_to_every_replica(
    tiny_checkpoint: Path, files: dict[str, Path], tmp_path: Path, generator: Generator
) -> None:
    from zimage_turbo import GeneratorPool

    settings = ZImageSettings(model=str(tiny_checkpoint), progress=False)
    with GeneratorPool(settings=settings, devices=["cpu", "cpu"], strategy="cpu") as pool:
        assert pool.load_lora(files["comfyui"], scale=0.5) == "comfyui"
        assert [replica.loras for replica in pool.replicas] == [{"comfyui": 0.5}] * 2
        bad = tmp_path / "bad.safetensors"
        save_file({"transformer.nowhere.lora_A.weight": torch.ones(RANK, 64)}, bad)
        with pytest.raises(LoraError):
            pool.load_lora(bad)
        pool.set_lora_scale("comfyui", 0.9)
        outcomes = pool.generate_many([PROMPT, PROMPT], seed=SEED, **SIZE)
        assert pool.loras == {"comfyui": 0.9}
        assert all(o.loras == {"comfyui": 0.9} for o in outcomes)  # type: ignore[union-attr]
        generator.load_lora(files["comfyui"], scale=0.9)
        alone = generator.generate_many([PROMPT, PROMPT], seed=SEED, **SIZE)
        assert all(same(o.image, a.image) for o, a in zip(outcomes, alone, strict=True))  # type: ignore[union-attr]
        pool.unload_lora()
        assert [replica.loras for replica in pool.replicas] == [{}, {}]


# -- command line and batches ---------------------------------------------------------------------------------


def test_cli_generate_takes_loras_with_scales(
    tiny_checkpoint: Path, files: dict[str, Path], tmp_path: Path, generator: Generator
) -> None:
    from zimage_turbo.cli import main, parse_lora

    assert parse_lora("a/b:0.5") == ("a/b", 0.5)
    assert parse_lora("C:\\loras\\ink.safetensors") == ("C:\\loras\\ink.safetensors", 1.0)
    assert parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT, "-o", str(out), "--size", "256x256", "--steps", "2", "--seed", str(SEED), "-q"]
    argv += ["--model", str(tiny_checkpoint), "--strategy", "cpu"]
    argv += ["--lora", f"{files['kohya']}:0.6", "--lora", str(files["second"])]
    assert main(argv) == 0
    generator.load_lora(files["kohya"], scale=0.6)
    generator.load_lora(files["second"])
    assert same(Image.open(out), generator.generate(PROMPT, seed=SEED, **SIZE).image)
    assert read_metadata(out)["loras"] == {"kohya": 0.6, "second": 1.0}  # type: ignore[index]
    # a bad LoRA is a usage error, found before the model loads (the model here does not exist)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"pickle")
    assert main([*argv[:-4], "--model", str(tmp_path / "absent"), "--lora", str(bad), "--overwrite"]) == 2


def test_batch_runs_with_loras_and_a_rerun_with_others_is_a_conflict(
    tiny_checkpoint: Path, files: dict[str, Path], tmp_path: Path, generator: Generator
) -> None:
    from zimage_turbo import BatchConflictError
    from zimage_turbo.batch import run_batch

    settings = ZImageSettings(model=str(tiny_checkpoint), progress=False, strategy="cpu")
    prompts = [{"id": "one", "prompt": PROMPT, "seed": SEED, "width": 256, "height": 256, "steps": 2}]
    report = run_batch(prompts, tmp_path / "out", settings=settings, devices=["cpu"], loras=[(files["comfyui"], 0.4)])
    assert report.generated == 1
    generator.load_lora(files["comfyui"], scale=0.4)
    assert same(Image.open(tmp_path / "out" / "one.png"), generator.generate(PROMPT, seed=SEED, **SIZE).image)
    again = run_batch(prompts, tmp_path / "out", settings=settings, devices=["cpu"], loras=[(files["comfyui"], 0.4)])
    assert (again.generated, again.skipped) == (0, 1)
    with pytest.raises(BatchConflictError, match="loras"):
        run_batch(prompts, tmp_path / "out", settings=settings, devices=["cpu"], loras=[(files["comfyui"], 0.5)])
    with pytest.raises(BatchConflictError, match="loras"):
        run_batch(prompts, tmp_path / "out", settings=settings, devices=["cpu"])
