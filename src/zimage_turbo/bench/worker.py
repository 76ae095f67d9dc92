"""One benchmark case, in a process of its own: ``python -m zimage_turbo.bench.worker '<spec as JSON>'``.

The last line it prints is ``RESULT <row as JSON>``. The spec says what to run (see :class:`Spec`); the row
holds every measurement of the case:

* ``load_s``: from the start of loading (imports included) to ready; ``first_image_s``: the first image,
  CUDA warm-up included; ``since_process_start_s``: process start to the first image (cold start);
* ``s_per_image`` (median) and ``all_s`` over ``images`` images after the first;
* ``peak_allocated_gib`` / ``peak_reserved_gib`` per GPU over the whole case; ``host_peak_rss_gib`` (the
  process's peak resident memory, pinned buffers included) and ``host_rss_after_gib`` (after the images);
* for our Generator: the strategy it used, fallbacks, VAE tiling, its predicted peaks and host homes;
* ``status``: ``ok``, or ``oom`` with the ``phase`` (``load`` or ``generate``) and the error's first line.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PROMPT", "SEED", "Spec", "run_spec"]

PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"
SEED = 7
GIB = 2**30


@dataclass(frozen=True)
class Spec:
    """What one worker process runs."""

    kind: str  # "ours", "diffusers", "sweep" or "probe"
    mode: str
    checkpoint: str
    key: str = ""
    budget_gib: float | None = None
    width: int = 1024
    height: int = 1024
    steps: int = 8
    images: int = 3
    device: str = "cuda"
    reference: str | None = None  # PNG of the reference image (written by the first case that may)
    sweep_sizes: list[list[int]] = field(default_factory=list)
    budgets: list[float | None] = field(default_factory=list)  # probe: plan for each
    # ours: settings (attention, compile, quantization); diffusers: "attention" (a diffusers backend name),
    # "compile" ("on": compile_repeated_blocks) and "quantize" ("fp8": torchao on the whole transformer)
    options: dict[str, str] = field(default_factory=dict)


def run_spec(spec: Spec) -> dict[str, Any]:
    """Run one case in this process and return its row."""
    import torch  # before any timing: both sides need it, and the cap is set through it

    del torch
    _cap(spec)
    row: dict[str, Any] = {"key": spec.key, "kind": spec.kind, "mode": spec.mode, "budget_gib": spec.budget_gib}
    runners: dict[str, Callable[[Spec], dict[str, Any]]] = {
        "ours": _ours,
        "diffusers": _diffusers,
        "sweep": _sweep,
        "probe": _probe,
    }
    row.update(runners[spec.kind](spec))
    return row


# -- our Generator -------------------------------------------------------------------------------------------


def _ours(spec: Spec) -> dict[str, Any]:
    started = time.perf_counter()  # load_s counts importing the model libraries, on both sides
    from zimage_turbo import Generator, NotEnoughMemoryError, ZImageSettings

    settings = ZImageSettings(**_our_settings(spec), **spec.options)
    gen = Generator(settings=settings, strategy=spec.mode)
    try:
        gen.load()
    except NotEnoughMemoryError as exc:
        return _oom("load", exc)
    _sync(spec)
    load_s = time.perf_counter() - started
    results: list[Any] = []

    def once(seed: int) -> Any:
        result = gen.generate(PROMPT, width=spec.width, height=spec.height, steps=spec.steps, seed=seed)
        results.append(result)
        return result.image

    try:
        row = _time_images(spec, once)
    except NotEnoughMemoryError as exc:
        return {**_oom("generate", exc), "load_s": load_s}
    last = results[-1]
    homes = getattr(gen.pipeline, "_zimage_turbo_homes", None)
    profile = gen._placement.profile if gen._placement is not None else None
    row.update(
        load_s=load_s,
        strategy=last.strategy,
        # the placement with its sizes (partial(18,9)): near-equal predictions can size the same strategy very
        # differently from one process to the next, and the split decides the speed once compiled
        placement=gen.strategy.label if gen.strategy is not None else None,
        fallbacks=[str(f) for r in results for f in r.fallbacks],
        vae_tiling=last.vae_tiling,
        attention=last.attention,
        compiled=[r.compiled for r in results],
        quantization=last.quantization,
        dtype=last.dtype,
        predicted_peak_gib={k: v / GIB for k, v in last.predicted_peak_memory.items()},
        host_homes_gib=homes.host_bytes / GIB if homes is not None else 0.0,
        weights_gib=profile.weight_bytes / GIB if profile is not None else None,
        timings=vars(last.timings),
    )
    _compare(spec, results[0].image, row)
    return row


def _our_settings(spec: Spec) -> dict[str, Any]:
    """Our settings for a case. Each case gets a cache folder of its own: the compile times that the library
    records there (and its compiled kernels) would otherwise carry from one case to the next on the same
    machine, and ``compile="auto"`` would decide differently than for a user's first run."""
    import tempfile

    cache = tempfile.mkdtemp(prefix="zimage-turbo-bench-cache-")
    return {"progress": False, "source": "local", "model": spec.checkpoint, "cache_dir": cache}


# -- plain diffusers, as people write it -------------------------------------------------------------------


def _diffusers(spec: Spec) -> dict[str, Any]:
    import torch

    started = time.perf_counter()  # load_s counts importing the model libraries, on both sides
    from diffusers import ZImagePipeline

    cuda = torch.device(spec.device)
    if spec.mode == "mmgp" and importlib.util.find_spec("mmgp") is None:
        return {"status": "skipped", "error": "mmgp is not installed"}
    try:
        pipe = ZImagePipeline.from_pretrained(spec.checkpoint, dtype=torch.bfloat16 if cuda.type == "cuda" else None)
        if spec.mode == "mmgp" and cuda.type == "cuda":
            # mmgp's profile for 12-16 GB cards with plenty of RAM, as its README shows it: the pipeline on the
            # CPU, then one call that pins, slices and moves the models as they run.
            from mmgp import offload, profile_type

            offload.profile(pipe, profile_type.HighRAM_LowVRAM)
        elif spec.mode == "to_cuda" or cuda.type != "cuda":
            pipe.to(cuda)
        elif spec.mode == "model_cpu_offload":
            pipe.enable_model_cpu_offload(device=cuda)
        elif spec.mode == "sequential_cpu_offload":
            pipe.enable_sequential_cpu_offload(device=cuda)
        elif spec.mode == "group_offload":
            # Block-level group offloading with a side stream prefetching the next block, diffusers' fastest
            # offloading; the small VAE stays resident (exclude_modules places it on the GPU).
            pipe.enable_group_offload(
                onload_device=cuda,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=True,
                exclude_modules=["vae"],
            )
        else:
            raise ValueError(f"unknown diffusers mode {spec.mode!r}")
        _diffusers_options(pipe, spec.options)
    except torch.OutOfMemoryError as exc:
        return _oom("load", exc)
    pipe.set_progress_bar_config(disable=True)
    _sync(spec)
    load_s = time.perf_counter() - started

    def once(seed: int) -> Any:
        generator = torch.Generator("cpu").manual_seed(seed)
        images = pipe(
            PROMPT,
            width=spec.width,
            height=spec.height,
            num_inference_steps=spec.steps,
            guidance_scale=0.0,
            generator=generator,
        ).images
        return images[0]

    try:
        row = _time_images(spec, once)
    except torch.OutOfMemoryError as exc:
        return {**_oom("generate", exc), "load_s": load_s}
    row["load_s"] = load_s
    row["dtype"] = str(pipe.transformer.dtype).removeprefix("torch.")
    first = row.pop("_first_image")
    _compare(spec, first, row)
    return row


def _diffusers_options(pipe: Any, options: dict[str, str]) -> None:
    """The speed-ups a diffusers user would add by hand, as its documentation shows them."""
    if options.get("quantize") == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        # activation_value_lb: without it the caption's all-zero padding rows get a zero scale and the
        # latents turn to NaN (a black image); the library sets the same bound.
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), activation_value_lb=1e-12)
        quantize_(pipe.transformer, config)
    if options.get("attention"):
        pipe.transformer.set_attention_backend(options["attention"])
    if options.get("compile") == "on":
        pipe.transformer.compile_repeated_blocks(fullgraph=True)


# -- resolution sweep --------------------------------------------------------------------------------------


def _sweep(spec: Spec) -> dict[str, Any]:
    from zimage_turbo import Generator, NotEnoughMemoryError, ZImageSettings

    gen = Generator(settings=ZImageSettings(**_our_settings(spec)), strategy=spec.mode).load()
    profile = gen._placement.profile if gen._placement is not None else None
    sizes: list[dict[str, Any]] = []
    for width, height in spec.sweep_sizes:
        results: list[Any] = []
        if spec.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()  # each size's peak its own, not the largest size's so far

        def once(seed: int, width: int = width, height: int = height, results: list[Any] = results) -> Any:
            result = gen.generate(PROMPT, width=width, height=height, steps=spec.steps, seed=seed)
            results.append(result)
            return result.image

        try:
            # A warm-up for the first size only: later sizes reuse the warm kernels, and the median of the
            # timed images shrugs off one slower first call.
            measured = _time_images(spec, once, warm_up=not sizes)
        except NotEnoughMemoryError as exc:
            sizes.append({"width": width, "height": height, **_oom("generate", exc)})
            continue
        measured.pop("_first_image", None)
        last = results[-1]
        measured.update(width=width, height=height, strategy=last.strategy, vae_tiling=last.vae_tiling)
        measured["fallbacks"] = [str(step) for result in results for step in result.fallbacks]
        measured["timings"] = vars(last.timings)
        if profile is not None:
            from zimage_turbo.profile import Workload

            measured["pass_tflop"] = profile.transformer_pass_tflop(Workload(height=height, width=width))
        sizes.append(measured)
    return {"status": "ok", "sizes": sizes}


def _probe(spec: Spec) -> dict[str, Any]:
    from .probe import probe

    return probe(spec.checkpoint, spec.device, spec.height, spec.width, spec.budgets)


# -- shared ------------------------------------------------------------------------------------------------


def _cap(spec: Spec) -> None:
    if spec.budget_gib is None or spec.device != "cuda":
        return
    import torch

    for index in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.budget_gib * GIB / total), index)


def _sync(spec: Spec) -> None:
    import torch

    if spec.device == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_images(spec: Spec, once: Callable[[int], Any], *, warm_up: bool = True) -> dict[str, Any]:
    """One warm-up image (the first timed one when ``warm_up`` is False), then ``spec.images`` timed ones;
    peaks over the whole case."""
    import torch

    cuda = spec.device == "cuda" and torch.cuda.is_available()
    _sync(spec)
    started = time.perf_counter()
    first = once(SEED)
    _sync(spec)
    first_s = time.perf_counter() - started
    since_start = _seconds_since_process_start()
    times = [] if warm_up else [first_s]
    for k in range(spec.images - (0 if warm_up else 1)):
        _sync(spec)
        started = time.perf_counter()
        once(SEED + 1 + k)
        _sync(spec)
        times.append(time.perf_counter() - started)
    devices = range(torch.cuda.device_count()) if cuda else range(0)
    return {
        "status": "ok",
        "_first_image": first,
        "first_image_s": first_s,
        "since_process_start_s": since_start,
        "s_per_image": statistics.median(times) if times else first_s,
        "all_s": times,
        "images": spec.images,
        "steps": spec.steps,
        "width": spec.width,
        "height": spec.height,
        "peak_allocated_gib": {f"cuda:{i}": torch.cuda.max_memory_allocated(i) / GIB for i in devices},
        "peak_reserved_gib": {f"cuda:{i}": torch.cuda.max_memory_reserved(i) / GIB for i in devices},
        "host_peak_rss_gib": _peak_rss() / GIB,
        "host_rss_after_gib": _rss() / GIB,
    }


def _compare(spec: Spec, image: Any, row: dict[str, Any]) -> None:
    """Difference from the reference image (the first case that can write one does); same size only."""
    row.pop("_first_image", None)
    if spec.reference is None:
        return
    import numpy as np
    from PIL import Image

    reference = Path(spec.reference)
    if not reference.is_file():
        if spec.kind == "ours" and spec.budget_gib is None:
            image.save(reference)
            row["difference"] = {"max_abs": 0.0, "mean_abs": 0.0, "reference": True}
        return
    theirs = np.asarray(Image.open(reference)).astype(np.int16)
    ours = np.asarray(image).astype(np.int16)
    if ours.shape == theirs.shape:
        diff = np.abs(ours - theirs)
        mse = float(np.mean(diff.astype(np.float64) ** 2))
        # PSNR in dB against the reference (None when identical); fp8 and tiled decodes are judged by it
        psnr = None if mse == 0 else float(10 * np.log10(255.0**2 / mse))
        row["difference"] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "psnr_db": psnr}


def _oom(phase: str, exc: BaseException) -> dict[str, Any]:
    from zimage_turbo.errors import first_line

    return {"status": "oom", "phase": phase, "error": first_line(exc), "host_peak_rss_gib": _peak_rss() / GIB}


def _peak_rss() -> int:
    from zimage_turbo.hardware import host_peak_rss_bytes

    return host_peak_rss_bytes()


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    spec = Spec(**json.loads(arguments[0]))
    try:
        row = run_spec(spec)
    except Exception as exc:  # reported as the case's result; the runner goes on with the next case
        import traceback

        from zimage_turbo.errors import first_line

        traceback.print_exc()
        row = {"key": spec.key, "kind": spec.kind, "mode": spec.mode, "budget_gib": spec.budget_gib}
        row.update(status="error", error=f"{type(exc).__name__}: {first_line(exc)}")
    print("RESULT " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
