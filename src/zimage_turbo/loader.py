"""Load a checked model folder into a diffusers ``ZImagePipeline``, each weight straight to where it will live.

The Generator asks the first strategy where each component should go (:meth:`LoadStrategy.load_targets`): a
GPU for components it keeps resident, the host homes (pinned buffers) for those it offloads. Each module is
built from its config with empty weights by its own library, then :mod:`zimage_turbo.weights` reads every
tensor from the safetensors files into its final place, cast to the run dtype on the way (the published
transformer is stored in float32). No full copy of the weights ever exists in pageable host memory, so
loading for an offloading strategy peaks at the weights plus a little, not twice the weights.

Only classes from a fixed list are ever instantiated: the class names in ``model_index.json`` select among
them and never cause an import, and no remote code is run.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from .early_read import EarlyReads, reads_early
from .errors import ModelLoadError, ZImageError
from .hardware import Hardware
from .host import HostHomes
from .layout import WEIGHTED_COMPONENTS, PipelineLayout
from .process_state import default_dtype, exclusive
from .progress import library_progress_bars
from .quiet_imports import quiet_imports
from .readahead import start_readahead
from .settings import DtypeName
from .weights import TensorEntry, fill_module, read_safetensors_header

__all__ = ["import_model_libraries", "load_pipeline", "resolve_dtype"]

logger = logging.getLogger(__name__)

# Where a component's weights go when the pipeline is loaded: a device, "homes" (pinned host homes, plain
# host tensors without CUDA) or "cpu" (plain host tensors).
Target = str | torch.device

# The order the components are read in (the largest first: the others arrive while it is being placed).
_FILL_ORDER = ("transformer", "text_encoder", "vae")


def resolve_dtype(name: DtypeName, device: torch.device, hardware: Hardware) -> torch.dtype:
    """The torch dtype for a setting value. ``"auto"``: bfloat16 where it is native, else float32.

    float16 is never chosen automatically: Z-Image produces NaN (black images) in float16 on GPUs
    without bf16, so those GPUs get float32.
    """
    if name != "auto":
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    if device.type == "cuda":
        index = device.index or 0
        gpu = next((g for g in hardware.gpus if g.index == index), None)
        return torch.bfloat16 if gpu is not None and gpu.bf16 else torch.float32
    if device.type == "mps":
        return torch.bfloat16
    return torch.float32


def load_pipeline(
    layout: PipelineLayout,
    *,
    dtype: torch.dtype,
    targets: Mapping[str, Target],
    homes: HostHomes,
    progress: bool,
) -> Any:
    """Build a ``ZImagePipeline`` from a complete folder (see :func:`~zimage_turbo.layout.check_pipeline_dir`),
    each weighted component's weights placed at ``targets[name]`` (default ``"homes"``)."""
    entries = {name: _entries(layout, name) for name in WEIGHTED_COMPONENTS}
    # the disk reads the files (if not in memory yet) while the libraries are imported
    start_readahead([path for name in _FILL_ORDER for path in layout.weight_paths(name)])
    # and the components headed for a GPU (or plain host memory) are read into it meanwhile (early_read.py)
    ahead = {name: reads_early(targets.get(name, "homes")) for name in _FILL_ORDER}
    jobs = [(name, entries[name], device) for name, device in ahead.items() if device is not None]
    early = EarlyReads(jobs, dtype)
    try:
        import_model_libraries()
        from diffusers import ZImagePipeline

        modules = _fill_modules(layout, entries, dtype, targets, homes, early, progress)
    finally:
        early.close()
    pipe = ZImagePipeline(**modules)
    return _finish(pipe, progress)


def import_model_libraries() -> None:
    """Import what a load builds the pipeline with, in one quiet window (seconds: diffusers imports
    ``torch._dynamo``, transformers imports torchao where it is installed; see quiet_imports.py)."""
    with quiet_imports():
        import accelerate  # noqa: F401
        import diffusers
        import transformers

        for name in ("ZImagePipeline", "ZImageTransformer2DModel", "AutoencoderKL", "FlowMatchEulerDiscreteScheduler"):
            getattr(diffusers, name)  # the lazy module imports each on first use
        for name in ("Qwen2Tokenizer", "Qwen3Config", "Qwen3ForCausalLM", "Qwen3Model"):
            getattr(transformers, name)


def _fill_modules(
    layout: PipelineLayout,
    entries: Mapping[str, list[TensorEntry]],
    dtype: torch.dtype,
    targets: Mapping[str, Target],
    homes: HostHomes,
    early: EarlyReads,
    progress: bool,
) -> dict[str, Any]:
    """The pipeline's components by name, each module built empty and given its weights (after
    :func:`import_model_libraries`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2Tokenizer

    total = sum(entry.nbytes for listed in entries.values() for entry in listed)
    modules: dict[str, Any] = {}
    try:
        with library_progress_bars(enabled=progress), _bytes_bar(total, enabled=progress) as advance:
            for name in _FILL_ORDER:
                started = time.perf_counter()
                module = _empty_module(layout, name, dtype)
                built = time.perf_counter()
                target = targets.get(name, "homes")
                ready = early.take(name)
                fill_module(
                    module, entries[name], dtype=dtype, destination=target, homes=homes, on_bytes=advance, ready=ready
                )
                modules[name] = module.eval()
                logger.debug(
                    "%s: built empty in %.2f s, weights into %s in %.2f s%s",
                    name,
                    built - started,
                    target,
                    time.perf_counter() - built,
                    " (read while the libraries were imported)" if ready is not None else "",
                )
            modules["tokenizer"] = Qwen2Tokenizer.from_pretrained(layout.root / "tokenizer")
            modules["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(layout.root / "scheduler")
    except (torch.OutOfMemoryError, MemoryError, ZImageError):  # out of memory: the Generator's ladder's business
        raise
    except Exception as exc:  # the libraries' errors for files they cannot use (the folder check misses some)
        raise ModelLoadError(f"Loading the model from {layout.root} failed: {type(exc).__name__}: {exc}") from exc
    return modules


def _finish(pipe: Any, progress: bool) -> Any:
    pipe.set_progress_bar_config(disable=not progress)
    # diffusers makes its denoising bar with tqdm.auto, which warns in a notebook without ipywidgets: make it with
    # ours. (The bar finds the pipeline through a weak reference, so the pipeline holds no cycle to itself.)
    pipe.progress_bar = partial(_pipeline_bar, weakref.ref(pipe))
    return pipe


def _pipeline_bar(pipe: weakref.ref[Any], iterable: Any = None, total: int | None = None) -> Any:
    """``DiffusionPipeline.progress_bar``, with the options of ``set_progress_bar_config``, made by
    :func:`~zimage_turbo.progress.tqdm_class`."""
    from .progress import tqdm_class

    options = dict(getattr(pipe(), "_progress_bar_config", None) or {})
    if iterable is not None:
        return tqdm_class()(iterable, **options)
    if total is not None:
        return tqdm_class()(total=total, **options)
    raise ValueError("Either `total` or `iterable` has to be defined.")


def _entries(layout: PipelineLayout, component: str) -> list[TensorEntry]:
    return [entry for path in layout.weight_paths(component) for entry in read_safetensors_header(path)]


def _empty_module(layout: PipelineLayout, component: str, dtype: torch.dtype) -> Any:
    """The component's module as its library builds it from the config, parameters on the meta device."""
    from accelerate import init_empty_weights

    folder = layout.root / component
    # exclusive: both contexts change what every thread of the process shares (see process_state.py)
    # include_buffers=False whatever the environment says: with buffers, accelerate would point every tensor
    # constructor of the process at the meta device meanwhile, and early_read.py's thread allocates tensors
    with exclusive(), init_empty_weights(include_buffers=False), default_dtype(dtype):
        if component == "text_encoder":
            from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

            causal = layout.classes["text_encoder"] == "Qwen3ForCausalLM"
            text_class = Qwen3ForCausalLM if causal else Qwen3Model
            return text_class._from_config(Qwen3Config.from_pretrained(folder), dtype=dtype)
        from diffusers import AutoencoderKL, ZImageTransformer2DModel

        model_class = ZImageTransformer2DModel if component == "transformer" else AutoencoderKL
        config = model_class.load_config(folder)
        model = model_class.from_config(config)
        model.register_to_config(_name_or_path=str(folder))
        return model


@contextmanager
def _bytes_bar(total: int, *, enabled: bool) -> Iterator[Any]:
    """A progress bar over the bytes read; yields the function that advances it."""
    if not enabled:
        yield None
        return
    from .progress import tqdm_class

    lock = threading.Lock()  # several threads read at once

    with tqdm_class()(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading weights") as bar:

        def advance(nbytes: int) -> None:
            with lock:
                bar.update(nbytes)

        yield advance
