"""The attention kernel: which of diffusers' kernels the transformer's attention runs through.

diffusers can run attention through several kernels (PyTorch's SDPA with its default choice, its flash, cuDNN
or memory-efficient kernels, or the FlashAttention packages when installed). Which is fastest depends on the
GPU and the PyTorch build, so ``"auto"`` measures: it times each available kernel on this model's attention
shape (a few milliseconds, once per GPU model and shape), checks that each gives the same output as the
default within bf16 rounding, and uses the fastest. The choice is remembered in the cache folder, keyed by
everything it depends on (GPU model, PyTorch, cuDNN and diffusers versions, the kernel packages installed,
dtype and shape), so a later process skips the measuring (with the kernels' first use, 0.23 s of a first image
on the H200).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import statistics
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import StrategyUnavailableError
from ..json_files import replace_json
from ..quiet_imports import quiet_imports

__all__ = [
    "ATTENTION_KERNELS",
    "ATTENTION_TOLERANCE",
    "AttentionShape",
    "attention_available",
    "choose_attention",
    "measure_attention",
    "set_attention",
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


# The file in the cache folder that remembers each choice (see choose_attention).
_CHOICES_FILE = "zimage-turbo-attention-kernels.json"


def choose_attention(
    device: torch.device, dtype: torch.dtype, shape: AttentionShape, cache_dir: Path | None = None
) -> tuple[str, dict[str, float]]:
    """The fastest exact kernel for ``shape`` on ``device``, and the seconds each took (inf: unavailable or
    not matching; empty when the choice was not measured now). Measured once per GPU model, dtype and shape in
    a process, and with ``cache_dir`` once on this machine: a choice remembered there is used while the kernel
    can still run here. Off CUDA it is ``"native"``."""
    if device.type != "cuda":
        return "native", {}
    key = (torch.cuda.get_device_name(device), torch.__version__, dtype, shape)
    with _choices_lock:
        if key in _choices:
            return _choices[key], {}
        remembered_key = _remembered_key(device, dtype, shape)
        remembered = _remembered(cache_dir).get(remembered_key) if cache_dir is not None else None
        if remembered in _AUTOMATIC_KERNELS and not attention_available(remembered, device):
            _choices[key] = remembered
            logger.info("attention kernel: %s (measured by an earlier run on this machine)", remembered)
            return remembered, {}
        seconds = measure_attention(device, dtype, shape, _AUTOMATIC_KERNELS)
        best = min(seconds, key=lambda name: seconds[name])
        if not math.isfinite(seconds[best]):
            best = "native"
        _choices[key] = best
        if cache_dir is not None:
            _remember(cache_dir, remembered_key, best)
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
    with quiet_imports():
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


def _remembered_key(device: torch.device, dtype: torch.dtype, shape: AttentionShape) -> str:
    """What a measured choice depends on: the GPU model, the libraries that hold the kernels, dtype and shape."""
    packages = sorted(name for name in _KERNEL_PACKAGES.values() if importlib.util.find_spec(name) is not None)
    try:
        diffusers_version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        diffusers_version = "?"
    return " / ".join(
        [
            torch.cuda.get_device_name(device),
            f"torch {torch.__version__}",
            f"cudnn {torch.backends.cudnn.version()}",  # type: ignore[no-untyped-call]
            f"diffusers {diffusers_version}",
            "+".join(packages) or "no kernel packages",
            str(dtype).removeprefix("torch."),
            f"{shape.batch}x{shape.tokens}x{shape.heads}x{shape.head_dim}",
        ]
    )


def _remembered(cache_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((cache_dir / _CHOICES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, unreadable or damaged: measure again (and write it anew)
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def _remember(cache_dir: Path, key: str, name: str) -> None:
    choices = {**_remembered(cache_dir), key: name}
    replace_json(cache_dir / _CHOICES_FILE, choices, what="the attention kernel chosen")


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    quiet = logging.getLogger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)
