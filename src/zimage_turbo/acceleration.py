"""Speed-ups on top of a placement: the attention kernel and regional ``torch.compile``.

None of these moves weights between devices, so they combine with any strategy that keeps the transformer
where it runs:

* **Attention.** diffusers can run attention through several kernels (PyTorch's SDPA with its default choice,
  its flash, cuDNN or memory-efficient kernels, or the FlashAttention packages when installed). Which is
  fastest depends on the GPU and the PyTorch build, so ``"auto"`` measures: it times each available kernel
  on this model's attention shape (a few milliseconds, once per GPU model and shape), checks that each gives
  the same output as the default within bf16 rounding, and uses the fastest.
* **Compile.** ``torch.compile`` of the transformer's repeated blocks (the 34 blocks run every pass;
  compiling only them costs a fraction of a whole-model compile), of the text encoder and of the VAE's
  decoder (:data:`COMPILE_PARTS`). Each pays off only over many images, since the first compile takes tens of
  seconds; :class:`CompileAdvisor` decides, part by part (see there).

Quantized weights (torchao fp8 or int8, a third speed-up) are made in :mod:`~zimage_turbo.quantize`; here
they only change what compiling the blocks saves.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import statistics
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import StrategyUnavailableError, first_line
from .failures import guard_compiled
from .settings import AttentionName, CompileMode

__all__ = [
    "ATTENTION_KERNELS",
    "COMPILE_PARTS",
    "COMPILE_SAVING",
    "Accelerator",
    "AttentionName",
    "AttentionShape",
    "CompileAdvisor",
    "CompileMode",
    "CompilePart",
    "attention_available",
    "choose_attention",
    "compile_cache_dir",
    "compile_key",
    "compile_part",
    "compile_unavailable",
    "compiled_parts",
    "measure_attention",
    "runs_unhooked_on",
    "set_attention",
    "uncompile_part",
    "use_compile_cache",
]

logger = logging.getLogger(__name__)

# Our names for diffusers' attention backends (diffusers.models.attention_dispatch.AttentionBackendName).
ATTENTION_KERNELS: Mapping[str, str] = {
    "native": "native",  # torch SDPA, letting PyTorch pick the kernel
    "flash": "_native_flash",  # torch SDPA's FlashAttention-2 kernel
    "cudnn": "_native_cudnn",
    "efficient": "_native_efficient",
    "math": "_native_math",
    "flash_attn": "flash",  # the flash-attn package (FlashAttention 2)
    "flash_attn_3": "_flash_3",  # the flash-attn 3 package (Hopper)
    "sage": "sage",  # SageAttention: 8-bit, lossy
}
# The package each kernel needs beyond PyTorch.
_KERNEL_PACKAGES = {"flash_attn": "flash_attn", "flash_attn_3": "flash_attn_interface", "sage": "sageattention"}
# Kernels the automatic choice considers: exact ones only (SageAttention quantizes; math is only a reference).
_AUTOMATIC_KERNELS = ("native", "flash", "cudnn", "efficient", "flash_attn", "flash_attn_3")
# Largest relative difference (Frobenius norm) from the default kernel that still counts as the same result:
# bf16 outputs of exact kernels differ by about 4e-3 from accumulation order alone.
ATTENTION_TOLERANCE = 2e-2

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
_RECORD_FILE = "zimage-turbo-compile-times.json"


# -- attention -------------------------------------------------------------------------------------------


def attention_available(name: str, device: torch.device) -> str:
    """Why kernel ``name`` cannot run on ``device`` ("" when it can)."""
    if name not in ATTENTION_KERNELS:
        return f"unknown attention kernel {name!r}; known: {', '.join(ATTENTION_KERNELS)}"
    if name in ("native", "math"):
        return ""
    if device.type != "cuda":
        return f"the {name} kernel needs a CUDA GPU"
    package = _KERNEL_PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        return f"the {name} kernel needs the {package} package, which is not installed"
    return ""


def set_attention(transformer: Any, name: str, device: torch.device) -> None:
    """Route the transformer's attention through kernel ``name`` (``"native"``: PyTorch's own choice), which
    must run on ``device``, where the transformer computes."""
    reason = attention_available(name, device)
    if reason:
        raise StrategyUnavailableError(reason)
    with _quiet_diffusers():  # diffusers warns that backends are experimental on every call
        if name == "native":
            transformer.reset_attention_backend()
        else:
            transformer.set_attention_backend(ATTENTION_KERNELS[name])


@dataclass(frozen=True)
class AttentionShape:
    """One attention call of the transformer: batch x tokens x heads x head size."""

    batch: int
    tokens: int
    heads: int
    head_dim: int

    @classmethod
    def of(cls, transformer: Any, height: int, width: int, batch: int = 1) -> AttentionShape:
        """The main layers' shape for an image of ``height`` x ``width`` pixels and a short prompt."""
        config = transformer.config
        heads = int(config.n_heads)
        patch = int(config.all_patch_size[0]) * 8  # latents are 1/8 of the pixels, patches are 2x2 latents
        caption_tokens = 128  # a typical prompt with the chat template, padded to a multiple of 32
        return cls(batch, (height // patch) * (width // patch) + caption_tokens, heads, int(config.dim) // heads)


_choices: dict[tuple[Any, ...], str] = {}
_choices_lock = threading.Lock()


def choose_attention(device: torch.device, dtype: torch.dtype, shape: AttentionShape) -> tuple[str, dict[str, float]]:
    """The fastest exact kernel for ``shape`` on ``device``, and the seconds each took (inf: unavailable or
    not matching). Measured once per GPU model, dtype and shape in a process; off CUDA it is ``"native"``."""
    if device.type != "cuda":
        return "native", {}
    key = (torch.cuda.get_device_name(device), torch.__version__, dtype, shape)
    with _choices_lock:
        if key in _choices:
            return _choices[key], {}
        seconds = measure_attention(device, dtype, shape, _AUTOMATIC_KERNELS)
        best = min(seconds, key=lambda name: seconds[name])
        if not math.isfinite(seconds[best]):
            best = "native"
        _choices[key] = best
    logger.info(
        "attention kernel: %s (%s)",
        best,
        ", ".join(f"{name} {value * 1e3:.2f} ms" for name, value in seconds.items() if math.isfinite(value)),
    )
    return best, seconds


def measure_attention(
    device: torch.device, dtype: torch.dtype, shape: AttentionShape, names: tuple[str, ...], repeats: int = 5
) -> dict[str, float]:
    """Median seconds of one attention call per kernel, timed with CUDA events on random inputs; inf for a
    kernel that is unavailable, fails, or differs from the default kernel beyond bf16 rounding."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    generator = torch.Generator(device).manual_seed(0)
    size = (shape.batch, shape.tokens, shape.heads, shape.head_dim)
    q, k, v = (torch.randn(size, device=device, dtype=dtype, generator=generator) for _ in range(3))
    results: dict[str, float] = {}
    with torch.inference_mode(), _quiet_diffusers():
        reference = dispatch_attention_fn(q, k, v, backend=None).float()

        for name in names:
            if attention_available(name, device):
                results[name] = math.inf
                continue
            backend = None if name == "native" else ATTENTION_KERNELS[name]
            try:
                out = dispatch_attention_fn(q, k, v, backend=backend)
                error = float((out.float() - reference).norm() / reference.norm())
                if not error <= ATTENTION_TOLERANCE:
                    logger.info("attention kernel %s differs from the default by %.2g; not used", name, error)
                    results[name] = math.inf
                    continue
                times = []
                for _ in range(repeats + 1):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                    start.record()
                    dispatch_attention_fn(q, k, v, backend=backend)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
                results[name] = statistics.median(times[1:])  # the first call may build plans or load code
            except Exception as exc:  # a kernel that rejects this GPU or shape is simply not a candidate
                logger.info("attention kernel %s unavailable here: %s", name, str(exc).splitlines()[0][:200])
                results[name] = math.inf
    return results


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    quiet = logging.getLogger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)


# -- compile ---------------------------------------------------------------------------------------------


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

    def modules(self, pipe: Any) -> list[torch.nn.Module]:
        return self.find(pipe)

    def compiled(self, pipe: Any) -> bool:
        if self.inside_hooks:
            return any(getattr(module, "compiled", None) is not None for module in self.modules(pipe))
        return any(getattr(module, "_compiled_call_impl", None) is not None for module in self.modules(pipe))


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


def _flat_fp8_linears(pipe: Any) -> list[torch.nn.Module]:
    from .flat_quantized import compilable_flat_linears  # imports this module

    return list(compilable_flat_linears(pipe.transformer))


COMPILE_PARTS: tuple[CompilePart, ...] = (
    # The transformer's 34 repeated blocks, one graph for all (regional compile).
    CompilePart("blocks", "denoise", COMPILE_SAVING, DEFAULT_COMPILE_SECONDS, _repeated_blocks),
    # The text encoder as a whole (transformers captures the hidden states with hooks that only a whole-model
    # compile traces). Eager, its 36 layers at 512 tokens are bound by Python, not by the GPU.
    CompilePart(
        "text_encoder",
        "encode",
        TEXT_ENCODER_SAVING,
        TEXT_ENCODER_COMPILE_SECONDS,
        lambda pipe: [pipe.text_encoder],
        _install_output_hooks,
    ),
    # The VAE's decoder: Inductor fuses its group norms and activations into the convolutions' neighbours.
    CompilePart(
        "vae_decoder", "decode", VAE_DECODER_SAVING, VAE_DECODER_COMPILE_SECONDS, lambda pipe: [pipe.vae.decoder]
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
        for part in module.modules():
            registry = getattr(part, "_diffusers_hook", None)
            if hasattr(part, "_hf_hook") or (registry is not None and getattr(registry, "hooks", None)):
                return False
        if any(parameter.device != device for parameter in module.parameters()):
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
        from .flat_quantized import compile_flat_linears

        compile_flat_linears(part.modules(pipe), failed)
        return
    for module in part.modules(pipe):
        compiled = torch.compile(module._call_impl, **COMPILE_OPTIONS)
        module._compiled_call_impl = guard_compiled(compiled, module._call_impl, failed)


def uncompile_part(pipe: Any, part: CompilePart) -> None:
    """Back to eager (strategies that hook modules, like streaming, run them uncompiled)."""
    if part.inside_hooks:
        from .flat_quantized import uncompile_flat_linears

        uncompile_flat_linears(part.modules(pipe))
        return
    for module in part.modules(pipe):
        module._compiled_call_impl = None


def compiled_parts(pipe: Any) -> tuple[str, ...]:
    """The names of the parts that run compiled now."""
    return tuple(part.name for part in COMPILE_PARTS if part.compiled(pipe))


def use_compile_cache(cache_dir: Path) -> None:
    """Inductor's caches go to ``cache_dir`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set already, so that a later
    process compiling the same graphs reuses the generated kernels instead of generating them again."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)


def compile_cache_dir(cache_root: Path | None) -> Path:
    """Where compiled kernels and measured compile times are kept: ``<cache_dir>/torch-compile`` when the
    settings name a cache folder, else ``$XDG_CACHE_HOME/zimage-turbo/torch-compile`` (``~/.cache`` by default)."""
    if cache_root is not None:
        return cache_root / "torch-compile"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zimage-turbo" / "torch-compile"


class CompileAdvisor:
    """Decides when compiling one part (the blocks unless ``part`` says otherwise) is a net win for the work
    this Generator is given.

    Compiling costs ``C`` seconds once (measured on this machine the last time, the part's
    ``default_compile_s`` before that; a warm kernel cache makes it much smaller) and then saves the part's
    ``saving`` share of every run of its phase (:data:`COMPILE_SAVING` of every denoising for the blocks).
    Two rules, checked together before each image (compile once their sum reaches ``C``):

    * **Known work.** When the images still to come in this call (``generate_many`` with many prompts) would
      save more than ``C``, compile now.
    * **Ski rental** for work that arrives one call at a time: once the time already spent eagerly in the
      part's phase would have saved ``C`` had the part been compiled, compile. Whatever the user does next, this never
      costs more than twice the best choice in hindsight.

    ``mode="on"`` compiles at once, ``"off"`` never; both only where the part runs resident and unhooked
    (the blocks under ``full_gpu`` and ``hybrid``, the text encoder and VAE under ``full_gpu``).
    """

    def __init__(
        self,
        mode: CompileMode,
        cache_dir: Path,
        device_key: str,
        part: CompilePart | None = None,
        saving: float | None = None,
    ) -> None:
        self.mode = mode
        self.cache_dir = cache_dir
        self.device_key = device_key
        self.part = part or COMPILE_PARTS[0]
        self.saving = self.part.saving if saving is None else saving
        self.eager_s = 0.0
        self.expected_compile_s = self._recorded().get(device_key, self.part.default_compile_s)

    def should_compile(self, upcoming_s: float) -> bool:
        """``upcoming_s``: predicted eager seconds of the part's phase for the images still to come in this
        call, the next one included."""
        if self.mode != "auto":
            return self.mode == "on"
        return self.saving * (self.eager_s + upcoming_s) >= self.expected_compile_s

    def ran_eager(self, seconds: float) -> None:
        self.eager_s += seconds

    def compiled_in(self, seconds: float) -> None:
        """Record what the compile took (the part's phase in its first compiled image, minus what that phase
        takes compiled)."""
        self.expected_compile_s = max(seconds, 0.0)
        records = self._recorded()
        records[self.device_key] = round(self.expected_compile_s, 2)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            temporary = self.cache_dir / (_RECORD_FILE + f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(records, indent=1, sort_keys=True))
            temporary.replace(self.cache_dir / _RECORD_FILE)
        except OSError as exc:  # a read-only home folder must not stop a generation
            logger.debug("could not record the compile time: %s", exc)

    def _recorded(self) -> dict[str, float]:
        try:
            data = json.loads((self.cache_dir / _RECORD_FILE).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def compile_key(device: torch.device, dtype: torch.dtype, quantization: str | None = None) -> str:
    """What a recorded compile time depends on: PyTorch's version, the device model, the dtype and the
    quantization (a quantized block is another graph)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    weights = quantization or str(dtype).removeprefix("torch.")
    return f"torch {torch.__version__} / {name} / {weights}"


# -- per Generator ---------------------------------------------------------------------------------------


class Accelerator:
    """A Generator's speed-ups: sets the attention kernel and decides what to compile, before each image.

    Args:
        attention: the ``attention`` setting.
        compile: the ``compile`` setting.
        cache_dir: where compiled kernels and compile times are kept (:func:`compile_cache_dir`).
    """

    def __init__(self, attention: AttentionName, compile: CompileMode, cache_dir: Path) -> None:
        self.attention_setting = attention
        self.compile_mode = compile
        self.cache_dir = cache_dir
        self.attention = "native"  # the kernel in use
        self._attention_for: tuple[Any, ...] | None = None  # (device, shape) the kernel was chosen for
        self._advisors: dict[str, CompileAdvisor] = {}
        self._compiling: dict[str, CompileAdvisor] = {}  # parts whose first compiled image is running
        self._failed: set[str] = set()  # parts the compiler failed on: eager from then on
        self._compiled: set[str] = set()  # parts compiled now (walking the modules to find out takes ms)
        # whether each part runs unhooked on the device, under the placement it was checked for
        self._placement: tuple[int, object] | None = None  # (id of the pipeline, the caller's placement)
        self._unhooked: dict[str, bool] = {}
        # measured eager seconds over the planner's prediction, per phase
        self._eager_rate: dict[str, float] = {"encode": 1.0, "denoise": 1.0, "decode": 1.0}

    def prepare(
        self,
        pipe: Any,
        device: torch.device,
        dtype: torch.dtype,
        compilable: bool,
        upcoming: tuple[int, int, Mapping[str, float]],
        quantization: str | None = None,
        placement: object = None,
    ) -> None:
        """Before an image: the attention kernel for this shape, and each part compiled or not.

        ``compilable``: the strategy keeps the transformer on one device with nothing hooked into its blocks.
        ``upcoming`` is (height, width, predicted eager seconds per phase of the images left in this call).
        ``placement`` identifies the placement of the weights: while it stays the same, which parts run
        unhooked is not checked again (a walk over every module and weight). None: check every time."""
        height, width, upcoming_s = upcoming
        transformer = pipe.transformer
        self._set_attention(transformer, device, dtype, AttentionShape.of(transformer, height, width))
        can_compile = not compile_unavailable(device)
        if device.type != "cuda" and self.compile_mode == "auto":
            can_compile = False  # on a CPU Inductor's compile would rarely pay back; "on" still compiles there
        if placement is None or (id(pipe), placement) != self._placement:
            self._placement = (id(pipe), placement)
            self._unhooked.clear()
            self._compiled = set(compiled_parts(pipe))
        for part in COMPILE_PARTS:
            runnable = can_compile and (compilable or part.inside_hooks) and part.name not in self._failed
            if runnable and part.name not in self._unhooked:
                modules = part.modules(pipe)
                self._unhooked[part.name] = bool(modules) if part.inside_hooks else runs_unhooked_on(modules, device)
            if not (runnable and self._unhooked[part.name]):
                if part.name in self._compiled:
                    uncompile_part(pipe, part)  # hooks of the new strategy must not run inside a compiled graph
                    self._compiled.discard(part.name)
                self._compiling.pop(part.name, None)
                continue
            if part.name in self._compiled:
                continue
            advisor = self._advisor(part, device, dtype, quantization)
            if advisor.should_compile(upcoming_s.get(part.phase, 0.0) * self._eager_rate[part.phase]):
                logger.info(
                    "compiling %s (expected %.0f s once; saves about %.0f%% of each %s)",
                    part.name,
                    advisor.expected_compile_s,
                    100 * advisor.saving,
                    part.phase,
                )
                use_compile_cache(self.cache_dir / "inductor")
                compile_part(pipe, part, self._compiler_failed)
                self._compiled.add(part.name)
                self._compiling[part.name] = advisor

    def finished(self, pipe: Any, measured: Mapping[str, float], predicted: Mapping[str, float]) -> None:
        """After an image: the seconds of each phase that ran in it (measured) and what the planner predicted
        for it eagerly."""
        for part in COMPILE_PARTS:
            phase = part.phase
            if phase not in measured:
                continue
            if part.name not in self._compiled:
                if predicted.get(phase, 0.0) > 0:
                    self._eager_rate[phase] = measured[phase] / predicted[phase]
                for advisor in self._advisors.values():
                    if advisor.part is part:
                        advisor.ran_eager(measured[phase])
                continue
            compiling = self._compiling.pop(part.name, None)
            if compiling is not None:
                expected = predicted.get(phase, 0.0) * self._eager_rate[phase] * (1 - compiling.saving)
                compiling.compiled_in(measured[phase] - expected)
                logger.info("%s compiled in about %.1f s", part.name, compiling.expected_compile_s)

    @property
    def compiled(self) -> tuple[str, ...]:
        """The parts compiled now, in :data:`COMPILE_PARTS` order."""
        return tuple(part.name for part in COMPILE_PARTS if part.name in self._compiled)

    def _compiler_failed(self, part: CompilePart, exc: BaseException) -> None:
        self._failed.add(part.name)
        self._compiled.discard(part.name)
        self._compiling.pop(part.name, None)
        logger.warning(
            "torch.compile failed on %s; it runs eagerly from now on (same images, slower): %s",
            part.name,
            first_line(exc),
        )

    def _advisor(
        self, part: CompilePart, device: torch.device, dtype: torch.dtype, quantization: str | None
    ) -> CompileAdvisor:
        saving = part.saving
        if part.name == "blocks":
            key = compile_key(device, dtype, quantization)
            saving = QUANTIZED_COMPILE_SAVING.get(quantization or "", saving)
        else:  # only the transformer is quantized
            key = f"{compile_key(device, dtype)} / {part.name}"
        if key not in self._advisors:
            self._advisors[key] = CompileAdvisor(self.compile_mode, self.cache_dir, key, part, saving)
        return self._advisors[key]

    def _set_attention(self, transformer: Any, device: torch.device, dtype: torch.dtype, shape: AttentionShape) -> None:
        wanted: tuple[Any, ...] = (device, shape if self.attention_setting == "auto" else None)
        if self._attention_for == wanted:
            return
        if self.attention_setting == "auto":
            name, _ = choose_attention(device, dtype, shape)
        else:
            name = self.attention_setting
            reason = attention_available(name, device)
            if reason:  # checked before loading for the first device; a fallback may have moved elsewhere
                logger.warning("attention=%r cannot run on %s (%s); using the default kernel", name, device, reason)
                name = "native"
        set_attention(transformer, name, device)
        self.attention = name
        self._attention_for = wanted
