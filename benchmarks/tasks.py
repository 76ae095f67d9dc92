"""Image-to-image, inpainting and ControlNet under VRAM budgets: zimage-turbo's ``auto`` against the matching
diffusers pipeline.

For each budget (unlimited, 16, 12, 4 GiB by default: a cap set with ``torch.cuda.set_per_process_memory_fraction``)
each side runs in a fresh process of its own, loads once, and times every task on the loaded model: one warm-up
image, then ``--images`` timed ones (the median is reported), the same seeds, inputs and passes on both sides.

* ours: ``Generator(strategy="auto")``, ``generate(prompt, image=..., [mask_image=...], strength=...)``;
* diffusers: ``ZImageImg2ImgPipeline.from_pretrained(dtype=bfloat16)`` with ``.to("cuda")`` when there is no cap,
  else block-level group offloading with a prefetching stream and the VAE resident (diffusers' fastest offload,
  as the bench harness runs it); ``ZImageInpaintPipeline`` built on its modules for inpainting.

The input is a 1024x1024 picture made here (gradients and noise), the mask a centred square; ``strength`` is each
pipeline's default (0.6 for image-to-image: 5 of 8 passes; 1.0 for inpainting: 8 passes). Every image is compared
with diffusers' image at no cap (``difference``: max and mean absolute difference, PSNR).

When the checkpoint holds a ControlNet (``make-checkpoint full DIR --controlnet``), the ControlNet tasks run too
(``control``: ``ZImageControlNetPipeline``; ``control_inpaint``: ``ZImageControlNetInpaintPipeline``), with a
control image of lines (an edge map's kind) at diffusers' default scale, 0.75. diffusers' side builds its ControlNet
pipeline from the same modules (its constructor) and places it as a user would (``.to("cuda")``, or group
offloading the ControlNet after the other modules); a failure there is recorded as the ControlNet tasks' error
(diffusers 0.42 refuses: the ControlNet pipeline registers the transformer's embedders inside the ControlNet,
which group offloading then hooks twice), and the other tasks keep their placement.

    python benchmarks/tasks.py --checkpoint /tmp/full --out benchmarks/results/tasks-h200.json
    python benchmarks/tasks.py --checkpoint /tmp/tiny --out /tmp/tasks.json --device cpu --size 256x256 --images 1

``--resume`` keeps the cases already in ``--out`` (the JSON is rewritten after every case), so a run cut short
by a time limit continues where it stopped; a case none of whose tasks made an image runs again.
``--attention native`` runs ours on the attention kernel diffusers uses (PyTorch's choice), to compare like with
like (``auto``, the default, is what users get); write it to another ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "the same harbour in a snowstorm at dusk, oil painting"
SEED = 7
GIB = 2**30
TASKS = ("image_to_image", "inpaint", "control", "control_inpaint")
CONTROL_TASKS = ("control", "control_inpaint")
CONTROL_SCALE = 0.75
BUDGETS = ("unlimited", "16", "12", "4")
# What the issue asks at 12 and 4 GiB: at least text-to-image's margin over group offload (1.28x at 4 GiB).
OFFLOAD_MARGIN = 1.28
# At unlimited (and 16 GiB where diffusers fits): within 3% of diffusers.
RESIDENT_TOLERANCE = 1.03


# -- one process: one side at one budget, every task ------------------------------------------------------


def worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    started = time.perf_counter()
    budget = spec["budget"]
    cuda = spec["device"] == "cuda"
    if cuda and budget != "unlimited":
        for index in range(torch.cuda.device_count()):
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, float(budget) * GIB / total), index)
    width, height = spec["width"], spec["height"]
    image, mask, edges = _inputs(width, height)
    run, describe = (_ours if spec["side"] == "ours" else _diffusers)(spec)
    _sync(cuda)
    load_s = time.perf_counter() - started
    rows = []
    for task in spec["tasks"]:
        arguments: dict[str, Any] = {} if task == "control" else {"image": image}
        if task in ("inpaint", "control_inpaint"):
            arguments["mask_image"] = mask
        if task in CONTROL_TASKS:
            arguments["control_image"] = edges
        row: dict[str, Any] = {"side": spec["side"], "task": task, "budget": budget, "load_s": load_s}
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def once(seed: int, task: str = task, arguments: dict[str, Any] = arguments) -> Any:
            return run(task, seed, arguments)

        try:
            times, first = _time(once, spec["images"], cuda)
        except torch.OutOfMemoryError as exc:
            rows.append({**row, "status": "oom", "error": str(exc).splitlines()[0]})
            continue
        except Exception as exc:  # ours raises NotEnoughMemoryError when every rung failed
            rows.append({**row, "status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
            continue
        row.update(status="ok", s_per_image=statistics.median(times), all_s=times, **describe(task))
        if cuda:
            row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        row["difference"] = _compare(first, Path(spec["reference_dir"]) / f"{task}.png", spec)
        rows.append(row)
    return rows


def _ours(spec: dict[str, Any]) -> tuple[Any, Any]:
    from zimage_turbo import Generator, ZImageSettings
    from zimage_turbo.task_inputs import denoising_steps

    cache = tempfile.mkdtemp(prefix="zimage-turbo-tasks-cache-")  # no compile times carried between cases
    controlnet = spec["checkpoint"] if set(spec["tasks"]) & set(CONTROL_TASKS) else None
    settings = ZImageSettings(
        model=spec["checkpoint"],
        source="local",
        progress=False,
        cache_dir=cache,
        controlnet=controlnet,
        attention=spec.get("attention", "auto"),
    )
    gen = Generator(settings=settings, strategy="auto").load()
    results: dict[str, Any] = {}

    def run(task: str, seed: int, arguments: dict[str, Any]) -> Any:
        scale = {"control_scale": CONTROL_SCALE} if task in CONTROL_TASKS else {}
        result = gen.generate(
            PROMPT, width=spec["width"], height=spec["height"], steps=spec["steps"], seed=seed, **arguments, **scale
        )
        results[task] = result
        return result.image

    def describe(task: str) -> dict[str, Any]:
        last = results[task]
        return {
            "strategy": last.strategy,
            "attention": last.attention,
            "fallbacks": [str(f) for f in last.fallbacks],
            "vae_tiling": last.vae_tiling,
            "strength": last.strength,
            "passes": denoising_steps(spec["steps"], last.strength or 1.0),  # ControlNet tasks: every step
            "timings": last.timings.to_dict(),
            "predicted_peak_gib": {k: v / GIB for k, v in last.predicted_peak_memory.items()},
            "host_peak_rss_gib": last.peak_memory.get("host", 0) / GIB,
        }

    return run, describe


def _diffusers(spec: dict[str, Any]) -> tuple[Any, Any]:
    import torch
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline

    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else None
    pipe = ZImageImg2ImgPipeline.from_pretrained(spec["checkpoint"], dtype=dtype)
    mode = f"to_{device.type}" if spec["budget"] == "unlimited" or device.type != "cuda" else "group_offload"
    # built on the same modules, as they are: from_pipe casts the modules it shares to its dtype argument, and that
    # casts the text encoder's rotary inv_freq, which from_pretrained keeps in float32, to bf16 too (prompt
    # embeddings, and so the image, then differ from what a user's from_pretrained pipeline makes)
    pipes = {"image_to_image": pipe, "inpaint": ZImageInpaintPipeline(**pipe.components)}
    controlnet_pipe = None
    if set(spec["tasks"]) & set(CONTROL_TASKS):  # the same modules and a ControlNet
        from diffusers import ZImageControlNetInpaintPipeline, ZImageControlNetModel, ZImageControlNetPipeline

        controlnet = ZImageControlNetModel.from_pretrained(Path(spec["checkpoint"]) / "controlnet", dtype=dtype)
        controlnet_pipe = pipes["control"] = ZImageControlNetPipeline(**pipe.components, controlnet=controlnet)
        pipes["control_inpaint"] = ZImageControlNetInpaintPipeline(**controlnet_pipe.components)
    unplaced: dict[str, str] = {}  # task -> why diffusers could not place its pipeline
    if mode != "group_offload":
        (controlnet_pipe or pipe).to(device)  # the ControlNet pipeline holds every module of the others
    else:
        offload = {
            "onload_device": device,
            "offload_device": torch.device("cpu"),
            "offload_type": "block_level",
            "num_blocks_per_group": 1,
            "use_stream": True,
        }
        pipe.enable_group_offload(**offload, exclude_modules=["vae"])
        if controlnet_pipe is not None:
            # The ControlNet pipeline registers the transformer's embedders and refiners inside the ControlNet
            # (from_transformer), so offloading it hooks those modules a second time, which diffusers 0.42
            # refuses ("Hook with name layer_execution_tracker already exists"): recorded as the ControlNet
            # tasks' error, the other tasks keep their placement.
            try:
                controlnet_pipe.controlnet.enable_group_offload(**offload)
            except Exception as exc:
                for task in CONTROL_TASKS:
                    unplaced[task] = f"diffusers' group offload cannot place the ControlNet: {exc}"
    passes: dict[str, int] = {}
    for each in pipes.values():
        each.set_progress_bar_config(disable=True)

    def run(task: str, seed: int, arguments: dict[str, Any]) -> Any:
        if task in unplaced:
            raise RuntimeError(unplaced[task])
        chosen = pipes[task]
        if task in CONTROL_TASKS:
            arguments = {**arguments, "controlnet_conditioning_scale": CONTROL_SCALE}
        image = chosen(
            PROMPT,
            width=spec["width"],
            height=spec["height"],
            num_inference_steps=spec["steps"],
            guidance_scale=0.0,
            generator=torch.Generator("cpu").manual_seed(seed),
            **arguments,
        ).images[0]
        passes[task] = int(chosen._num_timesteps)
        return image

    def describe(task: str) -> dict[str, Any]:
        return {"mode": mode, "passes": passes[task], "host_peak_rss_gib": _peak_rss() / GIB}

    return run, describe


def _inputs(width: int, height: int) -> tuple[Any, Any, Any]:
    """The picture, the mask and the control image (lines on black, as an edge map has them)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    noise = np.random.default_rng(0).integers(-24, 24, rgb.shape)
    image = Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8))
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    edges = np.zeros((height, width, 3), np.uint8)
    edges[height // 8 : height - height // 8 : max(height // 16, 1), :, :] = 255
    edges[:, width // 5 : width - width // 5 : max(width // 10, 1), 1] = 200
    return image, Image.fromarray(mask), Image.fromarray(edges)


def _time(once: Any, images: int, cuda: bool) -> tuple[list[float], Any]:
    """A warm-up image (returned, for the comparison), then ``images`` timed ones."""
    first = once(SEED)
    times = []
    for k in range(images):
        _sync(cuda)
        started = time.perf_counter()
        once(SEED + 1 + k)
        _sync(cuda)
        times.append(time.perf_counter() - started)
    return times, first


def _compare(image: Any, reference: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """Against diffusers' image at no cap, which the first case (diffusers, unlimited) writes."""
    import numpy as np
    from PIL import Image

    if not reference.is_file():
        if spec["side"] == "diffusers" and spec["budget"] == "unlimited":
            image.save(reference)
            return {"reference": True}
        return None
    ours = np.asarray(image).astype(np.int16)
    theirs = np.asarray(Image.open(reference)).astype(np.int16)
    difference = np.abs(ours - theirs)
    mse = float(np.mean(difference.astype(np.float64) ** 2))
    psnr = None if mse == 0 else float(10 * np.log10(255.0**2 / mse))
    return {"max_abs": float(difference.max()), "mean_abs": float(difference.mean()), "psnr_db": psnr}


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the run: every (side, budget) in a fresh process ---------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and budget: both sides' seconds per image, the speed-up, and the issue's target for it."""
    found = {(r["side"], r["task"], r["budget"]): r for r in rows}
    lines = []
    for task in TASKS:
        for budget in BUDGETS:
            ours, theirs = found.get(("ours", task, budget)), found.get(("diffusers", task, budget))
            if ours is None and theirs is None:
                continue
            line: dict[str, Any] = {"task": task, "budget": budget}
            for side, row in (("ours", ours), ("diffusers", theirs)):
                ok = row is not None and row["status"] == "ok"
                line[side] = row["s_per_image"] if ok and row is not None else (row or {}).get("status")
            line["strategy"] = ours.get("strategy") if ours else None
            line["diffusers_mode"] = theirs.get("mode") if theirs else None
            if isinstance(line["ours"], float) and isinstance(line["diffusers"], float):
                line["speedup"] = line["diffusers"] / line["ours"]
                needed = 1 / RESIDENT_TOLERANCE if budget in ("unlimited", "16") else OFFLOAD_MARGIN
                line["target"] = f"speedup >= {needed:.2f}"
                line["met"] = line["speedup"] >= needed
            elif isinstance(line["ours"], float):
                line["target"], line["met"] = "an image where diffusers has none", True
            lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=BUDGETS)
    parser.add_argument(
        "--tasks", nargs="+", default=None, choices=TASKS, help="default: all, the ControlNet ones if it has one"
    )
    parser.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--images", type=int, default=3, help="timed images per task, after one warm-up")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: only to try the script")
    parser.add_argument("--resume", action="store_true", help="keep the cases already in --out")
    parser.add_argument("--case-timeout-s", type=float, default=300)
    parser.add_argument(
        "--attention",
        default="auto",
        help="ours' attention setting (native: the kernel PyTorch picks, as diffusers runs; auto: the fastest timed)",
    )
    args = parser.parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.checkpoint is None or args.out is None:
        parser.error("--checkpoint and --out are required")
    if args.tasks is None:
        control = (args.checkpoint / "controlnet" / "config.json").is_file()
        args.tasks = [task for task in TASKS if control or task not in CONTROL_TASKS]
    width, height = (int(v) for v in args.size.lower().split("x"))
    report: dict[str, Any] = {
        "benchmark": "tasks",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": os.environ.get("ZT_GIT_COMMIT", "unknown"),
        "settings": {
            "size": args.size,
            "steps": args.steps,
            "images": args.images,
            "prompt": PROMPT,
            "attention": args.attention,
        },
        "rows": [],
    }
    if args.resume and args.out.is_file():
        report = json.loads(args.out.read_text(encoding="utf-8"))
    # a case counts as done once one of its tasks made an image; one where every task failed (a crash, a time
    # limit, a placement that could not be made) runs again, its old rows replaced
    done = {(r["side"], r["budget"]) for r in report["rows"] if r["status"] == "ok"}
    report["rows"] = [r for r in report["rows"] if (r["side"], r["budget"]) in done]
    reference_dir = args.out.with_name(args.out.stem + "-references")
    reference_dir.mkdir(parents=True, exist_ok=True)
    budgets = args.budgets if args.device == "cuda" else ["unlimited"]
    # diffusers at no cap first: its images are the references every other case is compared with
    cases = [(side, budget) for budget in budgets for side in ("diffusers", "ours")]
    for side, budget in cases:
        if (side, budget) in done:
            continue
        spec = {
            "side": side,
            "budget": budget,
            "checkpoint": str(args.checkpoint),
            "tasks": args.tasks,
            "width": width,
            "height": height,
            "steps": args.steps,
            "images": args.images,
            "device": args.device,
            "reference_dir": str(reference_dir),
            "attention": args.attention,
        }
        started = time.perf_counter()
        rows = _run(spec, args.case_timeout_s)
        for row in rows:
            row["case_s"] = time.perf_counter() - started
            shown = f"{row['s_per_image']:.2f} s/image" if row["status"] == "ok" else row.get("error", row["status"])
            print(f"{side:9} {row['task']:14} @{budget:>9}: {shown} {row.get('strategy') or row.get('mode') or ''}")
        report["rows"] += rows
        report["summary"] = summarize(report["rows"])
        _write(args.out, report)
    print(json.dumps(report.get("summary", []), indent=1))
    return 0


def _run(spec: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    failed = [{"side": spec["side"], "task": task, "budget": spec["budget"]} for task in spec["tasks"]]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [{**row, "status": "error", "error": f"timed out after {timeout_s:g} s"} for row in failed]
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not results:
        tail = (done.stderr or done.stdout)[-1500:]
        return [{**row, "status": "error", "error": f"exit status {done.returncode}: {tail}"} for row in failed]
    rows: list[dict[str, Any]] = json.loads(results[-1].removeprefix("RESULT "))
    return rows


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.part")
    temporary.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


if __name__ == "__main__":
    raise SystemExit(main())
