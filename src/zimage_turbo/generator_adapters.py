"""The LoRA and ControlNet side of :class:`~zimage_turbo.generator.Generator`.

:class:`GeneratorAdapters` holds the Generator's LoRA methods (``load_lora``, ``set_lora_scale``, ``unload_lora``,
``loras``): each change is checked before any weight changes, then fused into the loaded weights under the
Generator's lock (see :mod:`~zimage_turbo.adapters`), and undone if fusing fails half-way. It also finds the
ControlNet of the ``controlnet`` setting for a control request, checked against the model from headers only, so
that one that cannot be used is refused before any weight moves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .adapters import check_fits
from .controlnet_sources import ControlNetSource, find_controlnet
from .errors import ControlNetError
from .generator_core import GENERATOR_LOGGER, GeneratorCore
from .loras import Lora, added, check_scale, read_lora_source, removed, rescaled
from .placement import Placement
from .sources import resolve_model

__all__ = ["GeneratorAdapters"]

logger = logging.getLogger(GENERATOR_LOGGER)


class GeneratorAdapters(GeneratorCore):
    """A Generator's LoRAs and ControlNet (see the module's description)."""

    # Set by Generator.__init__.
    _loras: tuple[Lora, ...]
    _controlnet: ControlNetSource | None

    # -- LoRA --------------------------------------------------------------------------------------------

    def load_lora(
        self,
        source: str | os.PathLike[str],
        *,
        scale: float = 1.0,
        name: str | None = None,
        weight_name: str | None = None,
    ) -> str:
        """Load a LoRA and fuse it into the weights at ``scale``; returns the name it goes by (``name``, else the
        file's name without ``.safetensors``). Loads the model first if it is not loaded yet.

        ``source``: a ``.safetensors`` file, a folder holding one (``weight_name`` picks among several), or a
        Hugging Face / ModelScope repo id, looked up in the caches first and downloaded unless offline. Layouts:
        diffusers'/peft's, kohya's and ComfyUI's (whatever diffusers reads for Z-Image), transformer and
        text-encoder layers. Several LoRAs stack, each with its own scale. They stay through strategy switches
        and out-of-memory fallbacks, and cost nothing per image: they are in the weights (see
        :mod:`~zimage_turbo.adapters`). A file that cannot be used raises
        :class:`~zimage_turbo.errors.LoraError` naming it, before any weight changes.

            >>> gen.load_lora("styles/ink.safetensors", scale=0.8)  # doctest: +SKIP
            'ink'
        """
        lora = read_lora_source(source, scale=scale, name=name, weight_name=weight_name, settings=self.settings)
        self._change_loras(lambda loras: added(loras, lora), load=True)
        return lora.name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Fuse the loaded LoRA ``name`` at ``scale`` instead (0 takes it out of the weights and keeps it
        loaded). Changes only the layers it touches."""
        checked = check_scale(scale)
        self._change_loras(lambda loras: rescaled(loras, name, checked))

    def unload_lora(self, name: str | None = None) -> None:
        """Take the LoRA ``name`` (None: every LoRA) out of the weights. The layers it changed get their values
        back from the model's files, so the images are again exactly those without it."""
        self._change_loras(lambda loras: removed(loras, name))

    @property
    def loras(self) -> dict[str, float]:
        """The loaded LoRAs, name -> scale, in the order they were loaded."""
        return {lora.name: lora.scale for lora in self._loras}

    def _change_loras(self, change: Callable[[tuple[Lora, ...]], tuple[Lora, ...]], *, load: bool = False) -> None:
        """Apply ``change`` to the list of LoRAs (it raises for a bad one, before anything changes) and fuse
        the result. If fusing fails half-way, the list before is fused again and the exception propagates."""
        with self._guard.exclusive(), self._machine.current():
            self._guard.check_open()
            self._guard.check_device()
            wanted = change(self._loras)
            if self._placement is None and not load:
                self._loras = wanted  # nothing is fused without a model
                return
            with self._guard.watching_device():
                self._ensure_loaded()
                placement = self._placement
                assert placement is not None
                for lora in wanted:
                    check_fits(placement.pipe, lora.file)
                try:
                    placement.set_loras(wanted)
                except BaseException as exc:
                    self._restore_loras(placement, exc)
                    raise
            self._loras = wanted

    def _restore_loras(self, placement: Placement, exc: BaseException) -> None:
        if self._guard.note(exc):
            return
        try:
            placement.set_loras(self._loras)
        except Exception as problem:  # the first exception matters more
            logger.error("could not restore the LoRAs after %s: %s", type(exc).__name__, problem)
            placement.unsettled = True

    # -- ControlNet --------------------------------------------------------------------------------------

    def _find_controlnet(self, task: str) -> ControlNetSource:
        """The ControlNet of the settings, found and checked against the model once (headers only: a ControlNet
        that cannot be used is refused before any weight moves), and checked for ``task``."""
        if self._requested is not None and not self._requested.places_controlnet:
            raise ControlNetError(
                f"strategy {self._requested.name!r} does not place a ControlNet; use 'auto' (which runs control "
                "requests on one card) or a single-GPU strategy",
                argument="strategy",
            )
        if self._controlnet is None:
            model = self._placement.model if self._placement is not None else resolve_model(self.settings)
            self._controlnet = find_controlnet(self.settings, model.layout.root)
        self._controlnet.check_task(task)
        return self._controlnet
