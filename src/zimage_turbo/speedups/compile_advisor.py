"""When compiling a part pays: :class:`CompileAdvisor`, and the compile times and savings measured on this machine.

Each part (:data:`~zimage_turbo.speedups.compile.COMPILE_PARTS`) costs seconds to a minute to compile once and
then saves a share of its phase at every image. What it cost and what it saved here are recorded in the compile
cache folder, per PyTorch version, GPU model, dtype and quantization (:func:`compile_key`), so that later
processes decide with this machine's figures instead of the H200's defaults.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from ..json_files import replace_json
from ..settings import CompileMode
from .compile import COMPILE_PARTS, CompilePart, holds_files, kernel_cache_dir

__all__ = ["SAVING_BOUNDS", "WARM_CACHE_SHARE", "CompileAdvisor", "compile_key"]

logger = logging.getLogger(__name__)

_RECORD_FILE = "zimage-turbo-compile-times.json"
# A compile that finds its kernels in Inductor's cache (a later process on the same machine and versions) costs a
# share of one that generates them: the blocks' first compiled image took 22.8 s with an empty cache and 7.3 s
# with a warm one, against 2.7 s eagerly (20.1 s of compiling against 4.6 s), rounded up. Used until a compile
# from a warm cache has been measured here.
WARM_CACHE_SHARE = 0.25
# Suffix of the record of a compile that found the kernel cache warm.
_WARM = " / warm cache"
# Suffix of the record of the share of its phase that compiling the part saved here, measured at its first
# compiled run after the one that compiled it. The defaults above were measured on an H200 in bf16 and fp8;
# other cards gain more or less (the H200 itself, about 0.39 of the denoising at 923f722, not 0.33).
_SAVING = " / saving"
# A measured saving outside these bounds is more likely a disturbed measurement (a recompile for a new image
# size, another process on the GPU, a stall) than the compiler's doing: it is not kept.
SAVING_BOUNDS = (0.05, 0.8)


class CompileAdvisor:
    """Decides when compiling one part (the blocks unless ``part`` says otherwise) is a net win for the work
    this Generator is given.

    Compiling costs ``C`` seconds once and then saves the part's ``saving`` share of every run of its phase
    (:data:`~zimage_turbo.speedups.compile.COMPILE_SAVING` of every denoising for the blocks, until a compiled
    run here has measured it: :meth:`measured_saving`).
    Two rules, checked together before each image (compile once their sum reaches ``C``):

    * **Known work.** When the images still to come in this call (``generate_many`` with many prompts) would
      save more than ``C``, compile now.
    * **Ski rental** for work that arrives one call at a time: once the time already spent eagerly in the
      part's phase would have saved ``C`` had the part been compiled, compile. Whatever the user does next, this never
      costs more than twice the best choice in hindsight.

    ``C`` is what compiling took on this machine the last time (the part's ``default_compile_s`` before that).
    Once a compile of the same graphs (same PyTorch, device, dtype and quantization) has finished here, their
    kernels are in Inductor's cache (:func:`~zimage_turbo.speedups.compile.kernel_cache_dir`), and while that
    cache is there ``C`` is what a compile from the warm cache took, or :data:`WARM_CACHE_SHARE` of the first
    compile until one has been measured: a second process pays seconds, not a minute, and ``auto`` compiles for
    far less work.

    ``mode="on"`` or ``"all"`` compiles at once, ``"off"`` never; both only where the part runs resident and
    unhooked (the blocks under ``full_gpu`` and ``hybrid``, the text encoder and VAE under ``full_gpu``). The
    Generator's ``compile="on"`` gives ``"auto"`` to the parts that are not :attr:`CompilePart.at_once`
    (:meth:`~zimage_turbo.speedups.driver.SpeedupDriver.part_mode`).
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
        self.eager_s = 0.0
        records = self._recorded()
        #: the share of the phase compiling saves: as measured here the last time, else the part's default
        self.saving = records.get(device_key + _SAVING, self.part.saving if saving is None else saving)
        cold = records.get(device_key, self.part.default_compile_s)
        #: whether a compile of these graphs finished here before and Inductor's cache still holds files
        self.cache_warm = device_key in records and holds_files(kernel_cache_dir(cache_dir))
        warm = records.get(device_key + _WARM, WARM_CACHE_SHARE * cold)
        self.expected_compile_s = warm if self.cache_warm else cold

    def should_compile(self, upcoming_s: float) -> bool:
        """``upcoming_s``: predicted eager seconds of the part's phase for the images still to come in this
        call, the next one included."""
        if self.mode != "auto":
            return self.mode in ("on", "all")
        return self.saving * (self.eager_s + upcoming_s) >= self.expected_compile_s

    def ran_eager(self, seconds: float) -> None:
        self.eager_s += seconds

    def compiled_in(self, seconds: float) -> None:
        """Record what the compile took (the part's phase in its first compiled image, minus what that phase
        takes compiled)."""
        self.expected_compile_s = max(seconds, 0.0)
        self._record(_WARM if self.cache_warm else "", round(self.expected_compile_s, 2), "the compile time")

    def measured_saving(self, compiled_s: float, eager_s: float) -> None:
        """After a compiled run of the part's phase (not the one that compiled it): it took ``compiled_s``
        where ``eager_s`` was expected eagerly. The share saved becomes this advisor's and later ones'
        :attr:`saving` for these graphs, unless it falls outside :data:`SAVING_BOUNDS`."""
        if eager_s <= 0 or compiled_s <= 0:
            return
        saving = 1 - compiled_s / eager_s
        low, high = SAVING_BOUNDS
        if not low <= saving <= high:
            logger.info("not keeping a measured compile saving of %.0f%% (disturbed?)", 100 * saving)
            return
        self.saving = saving
        self._record(_SAVING, round(saving, 3), "the compile saving")

    def _record(self, suffix: str, value: float, what: str) -> None:
        """Keep ``value`` under this advisor's key plus ``suffix``, beside the other records."""
        records = self._recorded()
        records[self.device_key + suffix] = value
        replace_json(self.cache_dir / _RECORD_FILE, records, what=what)

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
