"""Regional ``torch.compile``: the parts of the pipeline that may run compiled, and when compiling pays.

``torch.compile`` of the transformer's repeated blocks (the 34 blocks run every pass; compiling only them costs
a fraction of a whole-model compile), of the text encoder, of the VAE's decoder, and of the fp8 layers of
streamed blocks (:data:`COMPILE_PARTS`). Each pays off only over many images, since the first compile takes
tens of seconds; :class:`~zimage_turbo.speedups.compile_advisor.CompileAdvisor` decides, part by part. A
compiler failure costs speed, never an image (:func:`~zimage_turbo.failures.guard_compiled`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..failures import guard_compiled
from ..flat_quantized import compilable_flat_linears, compile_flat_linears, uncompile_flat_linears
from ..settings import library_cache_dir
from .block_insides import block_insides, compile_insides, insides_compiled, uncompile_insides

__all__ = [
    "COMPILE_OPTIONS",
    "COMPILE_PARTS",
    "COMPILE_SAVING",
    "DEFAULT_COMPILE_SECONDS",
    "FLAT_FP8_COMPILE_SECONDS",
    "FLAT_FP8_SAVING",
    "QUANTIZED_COMPILE_SAVING",
    "TEXT_ENCODER_COMPILE_SECONDS",
    "TEXT_ENCODER_SAVING",
    "VAE_DECODER_COMPILE_SECONDS",
    "VAE_DECODER_SAVING",
    "CompilePart",
    "compile_cache_dir",
    "compile_part",
    "compile_unavailable",
    "compiled_parts",
    "holds_files",
    "kernel_cache_dir",
    "runs_unhooked_on",
    "uncompile_hooked",
    "uncompile_part",
    "use_compile_cache",
]

# Share of the denoising time that regional compile saves: 1.177 s to 0.779 s for 8 passes at 1024x1024 on an
# H200 (benchmarks/results/speed-h200-2026-11-23.json), rounded down.
COMPILE_SAVING = 0.33
# What the first compile costs when it has never been measured on this machine: the first compiled image took
# 22.8 s on the H200 with an empty kernel cache (7.3 s with a warm one), against 2.7 s for a first eager image.
DEFAULT_COMPILE_SECONDS = 20.0
# The same for the text encoder and the VAE decoder, measured on the H200 at 1024x1024
# (benchmarks/results/speed-compile-h200-2026-11-23.json): the text encoder's 0.037 s become 0.017 s (eager,
# it waits on Python: its 4 TFLOP are 5 ms of matmul), the decoder's 0.099 s become 0.055 s (Inductor fuses
# its normalisations and activations). Their first compiles took 44 s and 20 s with an empty kernel cache
# (tests/gpu, 512x512), so "auto" compiles them only after many images.
TEXT_ENCODER_SAVING = 0.5
TEXT_ENCODER_COMPILE_SECONDS = 45.0
VAE_DECODER_SAVING = 0.4
VAE_DECODER_COMPILE_SECONDS = 20.0
# fp8 blocks gain more from compiling (1.364 s to 0.569 s of denoising on the H200): eager, torchao quantizes
# each activation in separate kernels, which the compiled graph fuses into its neighbours.
QUANTIZED_COMPILE_SAVING = {"fp8": 0.55}
# Streamed fp8 blocks (hooks move their weights, so the blocks run eagerly) with only their linear layers'
# arithmetic compiled (flat_quantized.compile_flat_linears): 2.146 s to 1.823 s of denoising at 1024x1024 under
# 4 GiB on an H100 (benchmarks/results/speed-small-fp8-h100-2026-11-25.json), rounded down. Its first image
# took 6.3 s longer than an eager one (Inductor's cache empty).
FLAT_FP8_SAVING = 0.14
FLAT_FP8_COMPILE_SECONDS = 6.0
COMPILE_OPTIONS: dict[str, Any] = {"fullgraph": True}


@dataclass(frozen=True)
class CompilePart:
    """A part of the pipeline that ``torch.compile`` can speed up, the phase whose time it cuts, and how much.

    ``saving`` is the share of that phase's eager seconds that compiling saves and ``default_compile_s`` what
    the compile costs before it has been measured on this machine (both measured on an H200 at 1024x1024)."""

    name: str
    phase: Literal["encode", "denoise", "decode"]
    saving: float
    default_compile_s: float
    find: Callable[[Any], list[torch.nn.Module]]
    prime: Callable[[Any], None] | None = None  # set-up the part needs before its first compiled call
    #: compiled inside the strategy's hooks (its modules' own arithmetic, no weight moves in the graph): any
    #: strategy that has these modules may compile them. Such a part switches its modules itself.
    inside_hooks: bool = False
    #: every module the part may have compiled, when ``find`` picks some of them (the blocks that stay resident
    #: under ``partial``): those that a later placement hooks must go back to eager
    every: Callable[[Any], list[torch.nn.Module]] | None = None
    #: whether ``compile="on"`` compiles it at once; False: it waits until the work pays for it, as under
    #: ``"auto"`` (``"all"`` compiles it at once too)
    at_once: bool = True
    #: whether the modules of ``every`` that hooks move (the blocks ``partial`` streams) get their insides
    #: compiled beneath the hooks (:mod:`.block_insides`)
    insides: bool = False

    def modules(self, pipe: Any) -> list[torch.nn.Module]:
        return self.find(pipe)

    def inside(self, pipe: Any, hooked_only: bool = True) -> list[torch.nn.Module]:
        """The insides compiled beneath the hooks of the hooked modules of ``every`` (of all of them: False)."""
        if not self.insides or self.every is None:
            return []
        modules = self.every(pipe)
        return block_insides([m for m in modules if _hooked(m)] if hooked_only else modules, _hooked)

    def compiled(self, pipe: Any) -> bool:
        if self.inside_hooks:
            return any(getattr(module, "compiled", None) is not None for module in self.modules(pipe))
        return any(getattr(module, "_compiled_call_impl", None) is not None for module in self.modules(pipe)) or any(
            insides_compiled(module) for module in self.inside(pipe)
        )


def _install_output_hooks(pipe: Any) -> None:
    """transformers (5.x) captures hidden states with hooks that it installs on a model's first call, under a
    thread lock that Dynamo cannot trace: install them before the first call is a compiled one. Its module
    has moved between versions; if neither is found, a failed compile falls back to eager (see compile_part)."""
    import importlib

    for module in ("transformers.utils.output_capturing", "transformers.utils.generic"):
        with contextlib.suppress(ImportError):
            install = getattr(importlib.import_module(module), "maybe_install_capturing_hooks", None)
            if install is not None:
                install(pipe.text_encoder)
                return


def _repeated_blocks(pipe: Any) -> list[torch.nn.Module]:
    transformer = pipe.transformer
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    return [module for module in transformer.modules() if type(module).__name__ in names]


def _unhooked_blocks(pipe: Any) -> list[torch.nn.Module]:
    """The repeated blocks that no offloading hook moves: all of them under ``full_gpu`` and ``hybrid``, the
    resident ones under ``partial``, none under ``streamed``."""
    return [block for block in _repeated_blocks(pipe) if not _hooked(block)]


def _hooked(module: torch.nn.Module) -> bool:
    """Whether an offloading hook (accelerate's or diffusers') sits on ``module`` or inside it."""
    for part in module.modules():
        registry = getattr(part, "_diffusers_hook", None)
        if hasattr(part, "_hf_hook") or (registry is not None and getattr(registry, "hooks", None)):
            return True
    return False


def _flat_fp8_linears(pipe: Any) -> list[torch.nn.Module]:
    return list(compilable_flat_linears(pipe.transformer))


COMPILE_PARTS: tuple[CompilePart, ...] = (
    # The transformer's 34 repeated blocks, one graph for all (regional compile); under `partial` the resident ones
    # whole and the streamed ones' attention, feed-forward and norms beneath their hooks.
    CompilePart(
        "blocks",
        "denoise",
        COMPILE_SAVING,
        DEFAULT_COMPILE_SECONDS,
        _unhooked_blocks,
        every=_repeated_blocks,
        insides=True,
    ),
    # The text encoder as a whole (transformers captures the hidden states with hooks that only a whole-model
    # compile traces). Eager, its 36 layers at 512 tokens are bound by Python, not by the GPU.
    CompilePart(
        "text_encoder",
        "encode",
        TEXT_ENCODER_SAVING,
        TEXT_ENCODER_COMPILE_SECONDS,
        lambda pipe: [pipe.text_encoder],
        _install_output_hooks,
        at_once=False,  # 0.02 s saved per image for 12.6 s of compiling with a warm cache, 52 s without
    ),
    # The VAE's decoder: Inductor fuses its group norms and activations into the convolutions' neighbours.
    CompilePart(
        "vae_decoder",
        "decode",
        VAE_DECODER_SAVING,
        VAE_DECODER_COMPILE_SECONDS,
        lambda pipe: [pipe.vae.decoder],
        at_once=False,  # 0.04 s saved per image for 3.4 s of compiling with a warm cache, 21 s without
    ),
    # The fp8 linear layers of streamed blocks (flat_quantized.py): their activation quantization fused into
    # one kernel, inside the hooks that stream the blocks.
    CompilePart(
        "fp8_linears", "denoise", FLAT_FP8_SAVING, FLAT_FP8_COMPILE_SECONDS, _flat_fp8_linears, inside_hooks=True
    ),
)


def compile_unavailable(device: torch.device) -> str:
    """Why the pipeline cannot be compiled for ``device`` ("" when it can)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "torch.compile needs Triton for CUDA GPUs, and it is not installed (or not supported here)"
        if torch.cuda.get_device_capability(device) < (7, 0):
            return "torch.compile's GPU code generator (Triton) needs compute capability 7.0 or newer"
        return ""
    if device.type == "cpu":
        return ""
    return f"torch.compile is not supported on {device.type}"


def runs_unhooked_on(modules: list[torch.nn.Module], device: torch.device) -> bool:
    """Whether ``modules`` run where they are, on ``device``, with no offloading hooks (accelerate's or
    diffusers') that move weights in their forward: a compiled graph must not contain those moves."""
    for module in modules:
        if _hooked(module) or any(parameter.device != device for parameter in module.parameters()):
            return False
    return bool(modules)


def compile_part(pipe: Any, part: CompilePart, on_failure: Callable[[CompilePart, BaseException], None]) -> None:
    """Compile each module of ``part`` in place (lazily: its first call pays for it).

    If the compiler fails (Dynamo cannot trace, Inductor cannot generate code), the part goes back to eager,
    ``on_failure`` is told, and the call runs eagerly: a compiler problem costs speed, never an image. Errors
    of the model itself propagate as they would eagerly. Modules of one class share one graph."""

    def failed(exc: BaseException) -> None:
        uncompile_part(pipe, part)
        on_failure(part, exc)

    if part.prime is not None:
        part.prime(pipe)
    if part.inside_hooks:
        compile_flat_linears(part.modules(pipe), failed)
        return
    for module in part.modules(pipe):
        if getattr(module, "_compiled_call_impl", None) is not None:
            continue  # compiled already (under an earlier placement that kept it resident too)
        compiled = torch.compile(module._call_impl, **COMPILE_OPTIONS)
        module._compiled_call_impl = guard_compiled(compiled, module._call_impl, failed)
    compile_insides(part.inside(pipe), COMPILE_OPTIONS, failed)


def uncompile_part(pipe: Any, part: CompilePart) -> None:
    """Back to eager (strategies that hook modules, like streaming, run them uncompiled)."""
    if part.inside_hooks:
        uncompile_flat_linears(part.modules(pipe))
        return
    for module in (part.every or part.find)(pipe):
        module._compiled_call_impl = None
    uncompile_insides(part.inside(pipe, hooked_only=False))


def uncompile_hooked(pipe: Any, part: CompilePart) -> None:
    """Back to eager for the modules of ``part`` that a new placement hooks (the blocks ``partial`` streams):
    their hooks move weights, which a compiled graph must not contain. The others stay compiled."""
    if part.inside_hooks or part.every is None:
        return
    kept = {id(module) for module in part.modules(pipe)}
    for module in part.every(pipe):
        if id(module) not in kept:
            module._compiled_call_impl = None
    streamed = {id(module) for module in part.inside(pipe)}  # insides of blocks now resident go back to eager
    uncompile_insides(module for module in part.inside(pipe, hooked_only=False) if id(module) not in streamed)


def compiled_parts(pipe: Any) -> tuple[str, ...]:
    """The names of the parts that run compiled now."""
    return tuple(part.name for part in COMPILE_PARTS if part.compiled(pipe))


def use_compile_cache(cache_dir: Path) -> None:
    """Inductor's caches go to ``cache_dir`` unless someone chose another folder (:func:`_chosen_kernel_cache`),
    so that a later process compiling the same graphs reuses the generated kernels instead of generating them
    again."""
    if _chosen_kernel_cache() is not None:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch_default = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    triton = os.environ.get("TRITON_CACHE_DIR")
    if torch_default and triton and Path(triton).is_relative_to(torch_default):
        # derived from torch's default by an earlier compile in this process: Inductor derives it again
        del os.environ["TRITON_CACHE_DIR"]


def kernel_cache_dir(cache_dir: Path) -> Path:
    """Inductor's cache: the folder chosen in ``TORCHINDUCTOR_CACHE_DIR``, else ``inductor`` in ``cache_dir`` (the
    folder of :func:`compile_cache_dir`, where :func:`use_compile_cache` points Inductor before each compile)."""
    return _chosen_kernel_cache() or cache_dir / "inductor"


def _chosen_kernel_cache() -> Path | None:
    """``TORCHINDUCTOR_CACHE_DIR`` when it names a folder of someone's choosing. PyTorch sets the variable to its
    own default (a folder under the system's temporary directory, often emptied at a reboot) the first time it
    asks for the cache, and importing ``torch._dynamo`` asks (loading the model imports it): that value is not a
    choice, and the library's folder replaces it. Before this, every compile went to that default folder."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not chosen:
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another PyTorch layout: take the variable as set
        return Path(chosen)
    return None if os.path.abspath(chosen) == os.path.abspath(default_cache_dir()) else Path(chosen)


def holds_files(folder: Path) -> bool:
    """Whether any file lies in ``folder`` or below (stops at the first)."""
    try:
        return any(path.is_file() for path in folder.rglob("*"))
    except OSError:
        return False


def compile_cache_dir(cache_root: Path | None) -> Path:
    """Where compiled kernels and measured compile times are kept: ``<cache_dir>/torch-compile`` when the
    settings name a cache folder, else ``$XDG_CACHE_HOME/zimage-turbo/torch-compile`` (``~/.cache`` by default)."""
    return library_cache_dir(cache_root) / "torch-compile"
