"""ControlNet text-to-image and ControlNet inpainting on the tiny checkpoint with its tiny ControlNet, compared bit
for bit with diffusers' own pipelines.

The reference is what a user writes by hand: ``ZImageControlNetModel.from_pretrained`` and
``ZImageControlNetPipeline`` / ``ZImageControlNetInpaintPipeline`` loaded with ``from_pretrained`` and called with
seeded CPU generators. Ours loads the ControlNet at the first control request and places it with every placement
that runs on a CPU, after switches and after out-of-memory errors; bad inputs are refused before any weight moves.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from test_generator import same
from test_ladder import every_strategy
from test_tasks import picture, square_mask
from zimage_turbo import (
    ControlNetError,
    ControlNetNotFoundError,
    CPUOnly,
    FullGPU,
    Generator,
    InvalidImageError,
    ModelProfile,
    PartialOffload,
    StreamedOffload,
    Workload,
    ZImageSettings,
    make_checkpoint,
    read_metadata,
)
from zimage_turbo.batch import Manifest, run_batch
from zimage_turbo.cli import main
from zimage_turbo.controlnet import controlnet_of
from zimage_turbo.controlnet_sources import find_controlnet, resolve_controlnet, transformer_config
from zimage_turbo.errors import BatchConflictError
from zimage_turbo.hardware import GIB, GPUInfo, Hardware
from zimage_turbo.model import PRESETS
from zimage_turbo.planner import candidate_for
from zimage_turbo.profile import component_profile
from zimage_turbo.request import GenerationRequest
from zimage_turbo.strategies import Hybrid, ModelCPUOffload, MultiGPUDispatch, SequentialOffload
from zimage_turbo.task_inputs import task_inputs

PROMPT = "a lighthouse on a cliff, ink drawing"
SIZE = 256
STEPS = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with its ControlNet (in its folder ``controlnet``). Tests must not modify it."""
    return make_checkpoint("tiny", tmp_path_factory.mktemp("control") / "tiny", controlnet=True)


@pytest.fixture(scope="module")
def edges() -> Image.Image:
    """A control image: the kind of structure (lines on black) an edge map gives."""
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    pixels[32:224:16, :, :] = 255
    pixels[:, 40:200:24, 1] = 200
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def references(checkpoint: Path) -> dict[str, Any]:
    from diffusers import ZImageControlNetInpaintPipeline, ZImageControlNetModel, ZImageControlNetPipeline

    controlnet = ZImageControlNetModel.from_pretrained(checkpoint / "controlnet")
    pipes = {
        "control": ZImageControlNetPipeline.from_pretrained(checkpoint, controlnet=controlnet),
        "control_inpaint": ZImageControlNetInpaintPipeline.from_pretrained(checkpoint, controlnet=controlnet),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def diffusers_images(pipes: dict[str, Any], control: Image.Image, seeds: list[int], **arguments: Any) -> list[Any]:
    """The images diffusers makes (one seeded CPU generator per image, the output's size given)."""
    pipe = pipes["control_inpaint" if "mask_image" in arguments else "control"]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    arguments.setdefault("guidance_scale", 0.0)
    output = pipe(
        PROMPT,
        control_image=control,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=generators,
        num_images_per_prompt=len(seeds),
        **arguments,
    )
    return list(output.images)


@pytest.fixture(scope="module")
def reference(references: dict[str, Any], edges: Image.Image) -> Image.Image:
    [image] = diffusers_images(references, edges, [5])
    return image


@pytest.fixture(scope="module")
def generator(checkpoint: Path) -> Generator:
    return Generator(checkpoint, settings=ZImageSettings(progress=False, controlnet=str(checkpoint)))


@pytest.fixture(scope="module")
def plain(generator: Generator) -> Image.Image:
    """The generator's text-to-image picture before any ControlNet is loaded."""
    return generator.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, seed=5).image


def test_controlnet_text_to_image_equals_diffusers_and_the_result_says_how(
    generator: Generator, plain: Image.Image, reference: Image.Image, edges: Image.Image, tmp_path: Path
) -> None:
    result = generator.generate(PROMPT, control_image=edges, steps=STEPS, seed=5)
    assert same(result.image, reference)
    assert not same(result.image, plain)  # the ControlNet changed the image: the comparison has teeth
    assert (result.task, result.control_scale, result.strength) == ("control", 0.75, None)
    assert (result.controlnet, dict(result.input_sizes)) == ("tiny", {"control_image": (SIZE, SIZE)})
    assert result.timings.encode_image > 0 and result.timings.load > 0  # the ControlNet loaded with this call
    assert result.warnings == () and result.fallbacks == ()
    [saved] = result.save(tmp_path / "out.png")
    stored = read_metadata(saved)
    assert stored is not None
    assert (stored["task"], stored["control_scale"], stored["controlnet"]) == ("control", 0.75, "tiny")
    assert stored["input_sizes"] == {"control_image": f"{SIZE}x{SIZE}"} and stored["strength"] is None
    # after the ControlNet was loaded, text-to-image still gives the plain image
    assert same(generator.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, seed=5).image, plain)


def test_controlnet_text_to_image_of_two_images_with_guidance_equals_diffusers(
    generator: Generator, references: dict[str, Any], edges: Image.Image
) -> None:
    arguments = {"guidance_scale": 2.0, "negative_prompt": "blurry"}
    theirs = diffusers_images(references, edges, [7, 8], controlnet_conditioning_scale=0.5, **arguments)
    ours = generator.generate(
        PROMPT, control_image=edges, control_scale=0.5, steps=STEPS, seed=7, num_images=2, **arguments
    )
    assert all(same(a, b) for a, b in zip(ours.images, theirs, strict=True))
    assert not same(ours.images[0], ours.images[1])


def test_controlnet_inpainting_equals_diffusers(
    generator: Generator, references: dict[str, Any], edges: Image.Image
) -> None:
    image, mask = picture(), square_mask()
    arguments = {"image": image, "mask_image": mask, "guidance_scale": 1.5}
    [theirs] = diffusers_images(references, edges, [7], controlnet_conditioning_scale=0.5, **arguments)
    ours = generator.generate(PROMPT, control_image=edges, control_scale=0.5, steps=STEPS, seed=7, **arguments)
    assert same(ours.image, theirs)
    assert (ours.task, ours.control_scale, ours.strength) == ("control_inpaint", 0.5, None)
    assert set(ours.input_sizes) == {"image", "mask_image", "control_image"}
    # diffusers' pipeline does not repeat its mask for several images: refused before anything runs
    with pytest.raises(ControlNetError, match="one image per request") as caught:
        generator.generate(PROMPT, control_image=edges, steps=STEPS, seed=7, num_images=2, **arguments)
    assert caught.value.argument == "num_images"


def test_every_placement_and_switch_keeps_the_one_controlnet_and_gives_diffusers_image(
    generator: Generator, reference: Image.Image, edges: Image.Image
) -> None:
    first = generator.generate(PROMPT, control_image=edges, steps=STEPS, seed=5)  # cpu: loaded here or before
    assert same(first.image, reference)
    controlnet = generator.pipeline.controlnet
    partial = PartialOffload(device="cpu", transformer_blocks=1, text_encoder_blocks=1)
    for strategy in [*(s for s in every_strategy() if not isinstance(s, CPUOnly)), partial]:
        generator.switch(strategy)
        result = generator.generate(PROMPT, control_image=edges, steps=STEPS, seed=5)
        assert result.strategy == strategy.name and same(result.image, reference), strategy.name
        assert generator.pipeline.controlnet is controlnet, strategy.name  # never reloaded, never replaced
        assert result.timings.load == 0, strategy.name
    generator.switch("auto")
    # the transformer's modules it runs are shared, not registered: its parameters are its own
    assert controlnet.noise_refiner is generator.pipeline.transformer.noise_refiner
    assert all(name.startswith("control") for name, _ in controlnet.named_parameters())


def test_out_of_memory_in_the_controlnet_or_its_encoder_climbs_the_ladder(
    generator: Generator, reference: Image.Image, edges: Image.Image
) -> None:
    if generator.pipeline is None or controlnet_of(generator.pipeline) is None:  # this test alone
        generator.generate(PROMPT, control_image=edges, steps=STEPS, seed=5)
    pipe = generator.pipeline
    failing: list[str] = []

    def fail(name: str) -> Any:
        def hook(_module: Any, _args: Any) -> None:
            if name in failing:
                failing.remove(name)
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        return hook

    handles = [pipe.controlnet.register_forward_pre_hook(fail("controlnet"))]
    handles.append(pipe.vae.encoder.register_forward_pre_hook(fail("encoder")))
    try:
        for phase, name in (("denoise", "controlnet"), ("encode_image", "encoder")):
            generator.switch(FullGPU(device="cpu"))
            failing.append(name)
            result = generator.generate(PROMPT, control_image=edges, steps=STEPS, seed=5)
            [fallback] = result.fallbacks
            assert (fallback.kind, fallback.before, fallback.phase) == ("strategy", "full_gpu", phase)
            assert result.strategy == "cpu" and same(result.image, reference)
            assert failing == []
    finally:
        for handle in handles:
            handle.remove()
        generator.switch("auto")


def test_bad_inputs_are_refused_before_any_weight_moves(
    tiny_checkpoint: Path,
    checkpoint: Path,
    generator: Generator,
    plain: Image.Image,
    edges: Image.Image,
    tmp_path: Path,
) -> None:
    def refused(error: type[Exception], argument: str, gen: Generator = generator, **given: Any) -> None:
        with pytest.raises(error) as caught:
            gen.generate(PROMPT, steps=STEPS, seed=5, **given)
        assert getattr(caught.value, "argument", None) == argument, caught.value

    # no ControlNet configured: nothing loads at all
    bare = Generator(tiny_checkpoint, settings=ZImageSettings(progress=False))
    refused(ControlNetError, "control_image", bare, control_image=edges)
    assert not bare.is_loaded
    for scale in (math.nan, math.inf, -0.5, "0.5", True, None):
        refused(ControlNetError, "control_scale", control_image=edges, control_scale=scale)
    refused(ControlNetError, "image", control_image=edges, image=picture())  # no ControlNet image-to-image
    refused(ControlNetError, "strength", control_image=edges, strength=0.5)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    refused(InvalidImageError, "control_image", control_image=tmp_path / "broken.png")
    refused(InvalidImageError, "control_image", control_image=tmp_path / "missing.png")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", SIZE * SIZE - 1)
        refused(InvalidImageError, "control_image", control_image=edges)
    # a ControlNet that does not fit this transformer: another width, or weights its config does not build
    other = tmp_path / "other"
    shutil.copytree(checkpoint / "controlnet", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "control_in_dim": 17}))
    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint / "controlnet", truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    for setting in (str(other), str(truncated), str(tmp_path / "nowhere")):
        mismatched = Generator(checkpoint, settings=ZImageSettings(progress=False, controlnet=setting))
        error = ControlNetNotFoundError if setting.endswith("nowhere") else ControlNetError
        refused(error, "controlnet", mismatched, control_image=edges)
        assert not mismatched.is_loaded
    # a placement that does not place a ControlNet, asked for by name
    spread = Generator(
        checkpoint, settings=ZImageSettings(progress=False, controlnet=str(checkpoint)), strategy="multi_gpu"
    )
    refused(ControlNetError, "strategy", spread, control_image=edges)
    assert not spread.is_loaded
    # a repo that is not cached while offline: refused at once, without the network
    offline = ZImageSettings(progress=False, offline=True, controlnet="someone/no-such-controlnet")
    refused(ControlNetNotFoundError, "controlnet", Generator(checkpoint, settings=offline), control_image=edges)
    # after every refusal the Generator makes the image it made before
    assert same(generator.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, seed=5).image, plain)


def test_another_architecture_is_refused_naming_the_controlnet(checkpoint: Path, tmp_path: Path) -> None:
    from diffusers import ZImageControlNetModel

    narrow = dict(PRESETS["tiny"].controlnet, dim=32, n_heads=2, n_kv_heads=2)
    ZImageControlNetModel(**narrow).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ControlNetError, match="dim is 32") as caught:
        find_controlnet(ZImageSettings(controlnet=str(tmp_path / "narrow")), checkpoint)
    assert caught.value.argument == "controlnet"
    # the first Union version's kind (16 input channels) fits ControlNet text-to-image but not inpainting
    first = dict(PRESETS["tiny"].controlnet, control_in_dim=16, add_control_noise_refiner=None)
    first["control_refiner_layers_places"] = None
    ZImageControlNetModel(**first).save_pretrained(tmp_path / "first")
    source = find_controlnet(ZImageSettings(controlnet=str(tmp_path / "first")), checkpoint)
    source.check_task("control")
    with pytest.raises(ControlNetError, match="33 channels") as caught:
        source.check_task("control_inpaint")
    assert caught.value.argument == "mask_image"


def test_a_single_file_or_a_cached_repo_resolves_with_its_config(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hub_caches import huggingface_cache

    saved = json.loads((checkpoint / "controlnet" / "config.json").read_text())
    expected = {key: value for key, value in saved.items() if not key.startswith("_")}
    transformer = transformer_config(checkpoint)
    single = tmp_path / "published" / "Z-Image-Tiny-Fun-Controlnet.safetensors"
    single.parent.mkdir()
    shutil.copyfile(checkpoint / "controlnet" / "diffusion_pytorch_model.safetensors", single)
    # read off the tensors, as the published single files have no config
    from_file = resolve_controlnet(ZImageSettings(controlnet=str(single)), transformer)
    assert dict(from_file.config) == expected and from_file.label == single.name
    assert find_controlnet(ZImageSettings(controlnet=str(checkpoint / "controlnet")), checkpoint).label == "controlnet"
    from_folder = resolve_controlnet(ZImageSettings(controlnet=str(single.parent)), transformer)
    assert dict(from_folder.config) == expected and from_folder.files == (single,)
    shutil.copyfile(single, single.with_name("another.safetensors"))
    with pytest.raises(ControlNetError, match="name the file"):
        resolve_controlnet(ZImageSettings(controlnet=str(single.parent)), transformer)
    # a repo of several files in the Hugging Face cache, one named after the repo id, offline
    huggingface_cache(single.parent, tmp_path / "hf" / "hub", "someone/tiny-controlnet")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    name = f"someone/tiny-controlnet/{single.name}"
    cached = find_controlnet(ZImageSettings(controlnet=name, offline=True), checkpoint)
    assert dict(cached.config) == expected and cached.label == name


def test_control_inputs_size_the_output_and_give_their_arguments_back() -> None:
    control = picture(336, 272)
    inputs = task_inputs(control_image=control, control_scale=0.5)
    assert inputs is not None and (inputs.task, inputs.strength, inputs.control_scale) == ("control", 1.0, 0.5)
    assert inputs.output_size(None, None) == (272, 336)  # the control image's size, as image-to-image's
    again = task_inputs(**inputs.arguments())
    assert again is not None and (again.task, again.control_scale, again.sizes()) == ("control", 0.5, inputs.sizes())
    inpaint = task_inputs(picture(), square_mask(), None, control)
    assert inpaint is not None and inpaint.task == "control_inpaint" and inpaint.output_size(None, None) == (256, 256)
    request = GenerationRequest(PROMPT, height=256, width=256, num_images=3, inputs=inputs)
    work = Workload.of(request)  # diffusers encodes the control image once per image
    assert (work.control, work.image_encodes, request.denoising_steps) == (True, (3,), request.steps)
    assert Workload.of(GenerationRequest(PROMPT, inputs=inpaint)).image_encodes == (1, 1)
    assert inputs.resized(512, 512) == ["control_image was resized from 336x272 to 512x512 (Lanczos)"]


def test_the_profile_and_the_planner_count_the_controlnet() -> None:
    from diffusers import ZImageControlNetModel

    with torch.device("meta"):
        model = ZImageControlNetModel(**PRESETS["full"].controlnet)
    shapes = {name: ("BF16", tuple(t.shape)) for name, t in model.state_dict().items()}
    controlnet = component_profile("controlnet", shapes)
    assert 6.5e9 < controlnet.weight_bytes < 6.8e9 and len(controlnet.block_bytes) == 17  # Union 2.1: 3.3 B
    assert controlnet.block_names[:2] == ("control_noise_refiner.0", "control_noise_refiner.1")
    base = ModelProfile.z_image_turbo()
    profile = base.with_controlnet(controlnet)
    work, control = Workload(), Workload(control=True)
    gpu = GPUInfo(0, "H200", total_bytes=140 * GIB, free_bytes=139 * GIB, compute_capability=(9, 0))
    big = Hardware(gpus=(gpu,), host_available_bytes=400 * GIB)

    def peak(strategy: Any, model: ModelProfile, workload: Workload, phase: str = "") -> int:
        estimate = candidate_for(strategy, model, big, workload).estimate
        return max(estimate.by_phase[phase].values()) if phase else estimate.max_gpu_bytes

    # resident placements hold it in every request; streamed ones a little, and only while it runs
    assert peak(FullGPU(), profile, work) - peak(FullGPU(), base, work) == controlnet.weight_bytes
    assert peak(Hybrid(), profile, work) - peak(Hybrid(), base, work) == controlnet.weight_bytes
    assert peak(ModelCPUOffload(), profile, control) >= base.transformer.weight_bytes + controlnet.weight_bytes
    for strategy in (StreamedOffload(), SequentialOffload()):
        extra = peak(strategy, profile, control, "denoise") - peak(strategy, base, work, "denoise")
        assert 0 < extra < 2 * GIB, strategy.name
    assert peak(FullGPU(), profile, control, "denoise") > peak(FullGPU(), profile, work, "denoise")  # its hints
    seconds = [candidate_for(StreamedOffload(), profile, big, w).seconds for w in (work, control)]
    assert seconds[1] > 1.3 * seconds[0]
    # a 16 GiB card keeps fewer blocks resident with the ControlNet streaming beside them
    card = GPUInfo(0, "RTX 4080", total_bytes=16 * GIB, free_bytes=15 * GIB, compute_capability=(8, 9))
    small = Hardware(gpus=(card,), host_available_bytes=96 * GIB)
    kept = [candidate_for(PartialOffload(), p, small, control).strategy.residency for p in (base, profile)]  # type: ignore[attr-defined]
    assert kept[1].transformer <= kept[0].transformer and kept[1].text_encoder <= kept[0].text_encoder
    assert kept[1] != kept[0]
    # several GPUs: ControlNet requests go to single-card placements
    pair = Hardware(gpus=(gpu, GPUInfo(1, "H200", 140 * GIB, 139 * GIB, (9, 0))), host_available_bytes=400 * GIB)
    assert not candidate_for(MultiGPUDispatch(), profile, pair, control).fits


def test_batch_lines_and_the_command_line_take_a_control_image(
    checkpoint: Path, edges: Image.Image, tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    edges.save(tmp_path / "in" / "edges.png")
    prompts = tmp_path / "prompts.jsonl"
    line = {"prompt": PROMPT, "id": "drawn", "control": "in/edges.png", "control_scale": 0.6, "seed": 2}
    prompts.write_text(json.dumps({**line, "steps": STEPS}) + "\n")
    settings = ZImageSettings(model=str(checkpoint), progress=False, controlnet=str(checkpoint))
    report = run_batch(prompts, tmp_path / "out", settings=settings, devices=["cpu"])
    assert report.generated == 1 and not report.failed
    [row] = Manifest(tmp_path / "out").rows()
    assert (row["control"], row["control_scale"], "strength" in row) == (str(tmp_path / "in" / "edges.png"), 0.6, False)
    prompts.write_text(json.dumps({**line, "steps": STEPS, "control_scale": 0.7}) + "\n")
    with pytest.raises(BatchConflictError, match=r"control_scale 0\.6 -> 0\.7"):
        run_batch(prompts, tmp_path / "out", settings=settings, devices=["cpu"])

    # The command line, given the same line's arguments, makes the same image.
    out = tmp_path / "cli.png"
    arguments = ["generate", PROMPT, "--control", str(tmp_path / "in" / "edges.png"), "--control-scale", "0.6"]
    arguments += ["--steps", str(STEPS), "--seed", "2", "-o", str(out), "--controlnet", str(checkpoint)]
    assert main([*arguments, "--model", str(checkpoint), "-q", "--strategy", "cpu"]) == 0
    stored = read_metadata(out)
    assert stored is not None and (stored["task"], stored["control_scale"]) == ("control", 0.6)
    with Image.open(out) as cli, Image.open(tmp_path / "out" / "drawn.png") as batch:
        assert same(cli.convert("RGB"), batch.convert("RGB"))
    # no ControlNet configured: a bad argument (exit 2), before anything loads
    assert main(["generate", PROMPT, "--control", str(out), "--model", str(checkpoint), "-q"]) == 2
    # make-checkpoint --controlnet writes one beside the model
    assert main(["make-checkpoint", "tiny", str(tmp_path / "made"), "--controlnet", "-q"]) == 0
    assert json.loads((tmp_path / "made" / "controlnet" / "config.json").read_text())["control_in_dim"] == 33
