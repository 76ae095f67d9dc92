"""The speed-ups of one Generator: before each image, the attention kernel for its shape and which parts run
compiled; after it, what the phases took (which decides later compiles)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..controlnet import controlnet_of
from ..errors import first_line
from ..settings import AttentionName, CompileMode
from .attention import AttentionShape, attention_available, choose_attention, set_attention
from .compile import (
    COMPILE_PARTS,
    QUANTIZED_COMPILE_SAVING,
    CompilePart,
    compile_part,
    compile_unavailable,
    compiled_parts,
    kernel_cache_dir,
    runs_unhooked_on,
    uncompile_hooked,
    uncompile_part,
    use_compile_cache,
)
from .compile_advisor import CompileAdvisor, compile_key

__all__ = ["SpeedupDriver"]

logger = logging.getLogger(__name__)


class SpeedupDriver:
    """A Generator's speed-ups: sets the attention kernel and decides what to compile, before each image.

    Args:
        attention: the ``attention`` setting.
        compile: the ``compile`` setting.
        cache_dir: where compiled kernels and compile times are kept (:func:`.compile.compile_cache_dir`).
    """

    def __init__(self, attention: AttentionName, compile: CompileMode, cache_dir: Path) -> None:
        self.attention_setting = attention
        self.compile_mode = compile
        self.cache_dir = cache_dir
        self.attention = "native"  # the kernel in use
        self._attention_for: tuple[Any, ...] | None = None  # (device, shape) the kernel was chosen for
        self._advisors: dict[str, CompileAdvisor] = {}
        self._compiling: dict[str, CompileAdvisor] = {}  # parts whose first compiled image is running
        self._measuring: dict[str, CompileAdvisor] = {}  # parts compiled whose saving is measured at the next run
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
        shape = AttentionShape.of(transformer, height, width)
        controlnet = controlnet_of(pipe)  # its attention runs with the same kernel as the transformer's
        self._set_attention([transformer] if controlnet is None else [transformer, controlnet], device, dtype, shape)
        can_compile = not compile_unavailable(device)
        moved = placement is None or (id(pipe), placement) != self._placement
        if moved:
            self._placement = (id(pipe), placement)
            self._unhooked.clear()
            self._measuring.clear()  # a run under another placement (or recompiled) measures something else
            for part in COMPILE_PARTS:
                uncompile_hooked(pipe, part)  # blocks a new `partial` streams cannot stay compiled
            self._compiled = set(compiled_parts(pipe))
        for part in COMPILE_PARTS:
            runnable = can_compile and (compilable or part.inside_hooks) and part.name not in self._failed
            if device.type != "cuda" and self.part_mode(part) == "auto":
                runnable = False  # on a CPU Inductor's compile would rarely pay back; "on" still compiles there
            if runnable and part.name not in self._unhooked:
                self._unhooked[part.name] = _has_compilable(pipe, part, device)
            if not (runnable and self._unhooked[part.name]):
                if part.name in self._compiled:
                    uncompile_part(pipe, part)  # hooks of the new strategy must not run inside a compiled graph
                    self._compiled.discard(part.name)
                self._compiling.pop(part.name, None)
                continue
            if part.name in self._compiled:
                if moved:  # blocks that a new `partial` keeps resident and were streamed before: compile them too
                    compile_part(pipe, part, self._compiler_failed)
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
                use_compile_cache(kernel_cache_dir(self.cache_dir))
                compile_part(pipe, part, self._compiler_failed)
                self._compiled.add(part.name)
                self._compiling[part.name] = advisor

    def finished(self, pipe: Any, measured: Mapping[str, float], predicted: Mapping[str, float]) -> None:
        """After an image: the seconds of each phase that ran in it (measured) and what the planner predicted
        for it eagerly."""
        compiled_phases = {part.phase for part in COMPILE_PARTS if part.name in self._compiled}
        for part in COMPILE_PARTS:
            phase = part.phase
            if phase not in measured:
                continue
            if part.name not in self._compiled:
                # (the blocks and the fp8 layers share the denoising: a compiled one's run is not an eager rate)
                if predicted.get(phase, 0.0) > 0 and phase not in compiled_phases:
                    self._eager_rate[phase] = measured[phase] / predicted[phase]
                for advisor in self._advisors.values():
                    if advisor.part is part:
                        advisor.ran_eager(measured[phase])
                continue
            eager = predicted.get(phase, 0.0) * self._eager_rate[phase]  # what this run would take eagerly
            compiling = self._compiling.pop(part.name, None)
            if compiling is not None:
                compiling.compiled_in(measured[phase] - eager * (1 - compiling.saving))
                logger.info("%s compiled in about %.1f s", part.name, compiling.expected_compile_s)
                self._measuring[part.name] = compiling
                continue
            measuring = self._measuring.pop(part.name, None)
            if measuring is not None:
                measuring.measured_saving(measured[phase], eager)
                logger.info("%s compiled saves about %.0f%% of each %s", part.name, 100 * measuring.saving, phase)

    def part_mode(self, part: CompilePart) -> CompileMode:
        """The compile mode ``part`` follows: the setting, except that ``"on"`` leaves the parts that are not
        :attr:`~.compile.CompilePart.at_once` to the ``"auto"`` rule."""
        if self.compile_mode == "on" and not part.at_once:
            return "auto"
        return self.compile_mode

    @property
    def compiled(self) -> tuple[str, ...]:
        """The parts compiled now, in :data:`COMPILE_PARTS` order."""
        return tuple(part.name for part in COMPILE_PARTS if part.name in self._compiled)

    def _compiler_failed(self, part: CompilePart, exc: BaseException) -> None:
        self._failed.add(part.name)
        self._compiled.discard(part.name)
        self._compiling.pop(part.name, None)
        self._measuring.pop(part.name, None)
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
            self._advisors[key] = CompileAdvisor(self.part_mode(part), self.cache_dir, key, part, saving)
        return self._advisors[key]

    def _set_attention(
        self, models: list[Any], device: torch.device, dtype: torch.dtype, shape: AttentionShape
    ) -> None:
        wanted: tuple[Any, ...] = (device, shape if self.attention_setting == "auto" else None, len(models))
        if self._attention_for == wanted:
            return
        if self.attention_setting == "auto":
            name, _ = choose_attention(device, dtype, shape, self.cache_dir)
        else:
            name = self.attention_setting
            reason = attention_available(name, device)
            if reason:  # checked before loading for the first device; a fallback may have moved elsewhere
                logger.warning("attention=%r cannot run on %s (%s); using the default kernel", name, device, reason)
                name = "native"
        for model in models:
            set_attention(model, name, device)
        self.attention = name
        self._attention_for = wanted


def _has_compilable(pipe: Any, part: CompilePart, device: torch.device) -> bool:
    """Whether ``part`` has modules to compile under the current placement on ``device``: modules that run there
    unhooked, or the insides of hooked blocks (their hooks bring the weights there), or layers that compile
    inside hooks."""
    modules = part.modules(pipe)
    if part.inside_hooks:
        return bool(modules)
    return runs_unhooked_on(modules, device) if modules else bool(part.inside(pipe))
