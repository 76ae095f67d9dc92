"""LoRA adapters fused into the model's weights wherever they live, and taken out again exactly.

Fused, because then an image costs what it costs without the adapter: no extra matmuls per layer, and under
streamed placements the bytes crossing the bus per transformer pass do not grow (an unfused adapter would
have to travel too, or sit on the card). The price is paid once per change: for each changed layer,
``weight = base + sum(scale * up @ down)`` is computed in float32 (on the GPU when there is one) and rounded
once to the model's dtype.

Where: a weight can have two copies, the one its layer uses now (on a GPU under resident placements) and its
host home (:mod:`zimage_turbo.host`, where offloading placements stream it from and where a switch of
strategy sends it). Both are written, in place, so that every later placement, diffusers' group-offload hooks
(which hold the homes themselves) and compiled graphs (which read the same storage) see the fused values.
Quantized placements hold quantized copies made from these weights; :mod:`zimage_turbo.placement` removes
such a placement before fusing and applies it again afterwards (fuse in bf16, then quantize).

Exactly undone: a layer's base value is read from the weights themselves while no adapter has changed them,
and otherwise from the checkpoint's files, cast as loading casts them (subtracting an adapter again in bf16
would not give the base back bit for bit).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .errors import LoraError, ModelLoadError
from .host import HostHomes, return_freed_memory
from .layout import PipelineLayout
from .lora_files import LoraFile, LoraPair
from .loras import Lora
from .weights import TensorEntry, read_safetensors_header, read_tensors

__all__ = ["FusedWeights", "check_fits"]

logger = logging.getLogger(__name__)

# Base weights read back from the checkpoint at a time (host memory they take while a change is fused).
READ_BATCH_BYTES = 512 * 2**20
LayerKey = tuple[str, str]  # (component, layer name)


def check_fits(pipe: Any, lora: LoraFile) -> None:
    """Every layer of ``lora`` is a linear layer of the pipeline with the shapes of its factors.

    Raises :class:`~zimage_turbo.errors.LoraError` naming the file: with a few of the layers that match
    nothing (and a hint when none does: a LoRA for another model), or the first shape that differs.
    """
    missing: list[str] = []
    found = 0
    for component, layers in lora.layers.items():
        module = getattr(pipe, component)
        for layer, pair in layers.items():
            linear = _linear(module, layer)
            if linear is None:
                missing.append(f"{component}.{layer}")
                continue
            found += 1
            if (pair.up.shape[0], pair.down.shape[1]) != (linear.out_features, linear.in_features):
                raise LoraError(
                    f"{lora.path}: {component}.{layer} is a {linear.in_features}->{linear.out_features} layer, but "
                    f"the LoRA's factors are {list(pair.down.shape)} and {list(pair.up.shape)}: made for a model "
                    "of another size",
                    path=lora.path,
                )
    if not missing:
        return
    hint = (
        "none of its layers is in Z-Image-Turbo: is it a LoRA for another model?"
        if found == 0
        else f"{len(missing)} of its {found + len(missing)} layers are not in Z-Image-Turbo"
    )
    raise LoraError(f"{lora.path}: {hint} (e.g. {', '.join(missing[:3])})", path=lora.path)


def _linear(module: torch.nn.Module, layer: str) -> torch.nn.Linear | None:
    try:
        found = module.get_submodule(layer)
    except AttributeError:
        return None
    return found if isinstance(found, torch.nn.Linear) else None


class FusedWeights:
    """The adapters fused into one loaded pipeline, and the means to change them.

    ``homes`` are the pipeline's host homes, ``layout`` and ``dtype`` where and how its weights were loaded
    (the exact source of base values).
    """

    def __init__(self, pipe: Any, homes: HostHomes, layout: PipelineLayout, dtype: torch.dtype) -> None:
        self._pipe = pipe
        self._homes = homes
        self._checkpoint = _Checkpoint(layout, dtype)
        # what each changed layer holds now: the (factors, scale) summed into it, in order (the factors are
        # compared by identity, and kept alive here so that no other object can take their place)
        self._fused: dict[LayerKey, tuple[tuple[LoraPair, float], ...]] = {}
        self._loras: tuple[Lora, ...] = ()
        self._on_cpu = False  # set when the GPU had no room for a layer's float32 sum

    @property
    def scales(self) -> dict[str, float]:
        """Name -> scale of the adapters fused now, in the order they were loaded."""
        return {lora.name: lora.scale for lora in self._loras}

    def fuse(self, loras: Sequence[Lora]) -> int:
        """Make the weights hold ``loras`` (and nothing else). Layers whose sum does not change are not touched;
        a layer that held adapters and changes starts again from its base value in the checkpoint. Returns
        the number of layers written."""
        wanted: dict[LayerKey, list[tuple[LoraPair, float]]] = {}
        for lora in loras:
            if lora.scale == 0:
                continue
            for component, layers in lora.file.layers.items():
                for layer, pair in layers.items():
                    wanted.setdefault((component, layer), []).append((pair, lora.scale))
        signature = {key: tuple(terms) for key, terms in wanted.items()}
        changed = [key for key in sorted(set(wanted) | set(self._fused)) if signature.get(key) != self._fused.get(key)]
        from_files = [key for key in changed if key in self._fused]
        with torch.no_grad():
            for key, base in self._bases(changed, from_files):
                terms = wanted.get(key, [])
                self._write(key, self._sum(base, terms) if terms else base)
                if terms:
                    self._fused[key] = signature[key]
                else:
                    self._fused.pop(key, None)
        self._loras = tuple(loras)
        return_freed_memory()  # the base values read back and the float32 sums, freed: not kept by the allocator
        logger.info(
            "LoRA: %d layer(s) written (%d restored from the checkpoint); fused now: %s",
            len(changed),
            len(from_files),
            ", ".join(f"{name} x{scale:g}" for name, scale in self.scales.items()) or "none",
        )
        return len(changed)

    # -- one layer ----------------------------------------------------------------------------------------

    def _weight(self, key: LayerKey) -> torch.Tensor:
        component, layer = key
        linear = _linear(getattr(self._pipe, component), layer)
        assert linear is not None, key  # check_fits ran before
        weight = linear.weight
        if type(weight.data) is not torch.Tensor:  # a quantized copy: the placement should have been removed
            raise RuntimeError(f"{component}.{layer} holds a {type(weight.data).__name__}, not its weights")
        return weight

    def _bases(
        self, keys: Sequence[LayerKey], from_files: Sequence[LayerKey]
    ) -> Iterator[tuple[LayerKey, torch.Tensor]]:
        """Each layer's base value: what it holds now if no adapter changed it, else read from the checkpoint
        (in batches, so that the host holds at most a batch of them at once)."""
        reread = set(from_files)
        batch: list[LayerKey] = []
        batch_bytes = 0
        for key in keys:
            if key not in reread:
                yield key, self._weight(key).data
                continue
            batch.append(key)
            batch_bytes += self._weight(key).numel() * self._weight(key).element_size()
            if batch_bytes >= READ_BATCH_BYTES:
                yield from zip(batch, self._checkpoint.read(batch), strict=True)
                batch, batch_bytes = [], 0
        if batch:
            yield from zip(batch, self._checkpoint.read(batch), strict=True)

    def _sum(self, base: torch.Tensor, terms: Sequence[tuple[LoraPair, float]]) -> torch.Tensor:
        """``base + sum(scale * up @ down)`` in float32, rounded once to the base's dtype."""
        device = self._compute_device(base)
        if device.type == "cuda":
            total, failure = self._sum_on(base, terms, device)
            if total is not None:
                return total
            # the card has no room for it now: the CPU does the rest (outside the except, so memory is freed)
            logger.info("LoRA: no room on %s to fuse (%s); fusing on the CPU", device, failure)
            self._on_cpu = True
            torch.cuda.empty_cache()
        total, _ = self._sum_on(base, terms, torch.device("cpu"))
        assert total is not None
        return total

    @staticmethod
    def _sum_on(
        base: torch.Tensor, terms: Sequence[tuple[LoraPair, float]], device: torch.device
    ) -> tuple[torch.Tensor | None, str]:
        try:
            # across devices in the stored dtype, cast where the sum is made: torch would otherwise cast on the
            # host first (a float32 copy of every weight, made by one core)
            total = base.to(device, copy=True).float()
            for pair, scale in terms:
                total += (pair.up.to(device).float() @ pair.down.to(device).float()) * scale
            return total.to(base.dtype), ""
        except torch.OutOfMemoryError as exc:
            return None, str(exc).splitlines()[0] if str(exc) else "out of memory"

    def _compute_device(self, base: torch.Tensor) -> torch.device:
        if base.device.type == "cuda" and not self._on_cpu:
            return base.device
        if base.device.type == "cpu" and self._homes.pin and torch.cuda.is_available() and not self._on_cpu:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _write(self, key: LayerKey, value: torch.Tensor) -> None:
        """``value`` into the copy the layer uses now and into its host home (once each: without pinning, a
        host weight is its own home)."""
        weight = self._weight(key)
        written: set[tuple[str, int]] = set()
        for copy in (weight.data, self._homes.home_of(weight)):
            if copy is None or copy.is_meta:
                continue
            where = (str(copy.device), copy.data_ptr())
            if where not in written:
                copy.copy_(value)
                written.add(where)


class _Checkpoint:
    """The model's weight files, read back one batch of layers at a time."""

    def __init__(self, layout: PipelineLayout, dtype: torch.dtype) -> None:
        self._layout = layout
        self._dtype = dtype
        self._entries: dict[str, dict[str, TensorEntry]] = {}

    def read(self, keys: Sequence[LayerKey]) -> list[torch.Tensor]:
        entries = [self._entry(component, f"{layer}.weight") for component, layer in keys]
        return read_tensors(entries, self._dtype)

    def _entry(self, component: str, name: str) -> TensorEntry:
        entries = self._component(component)
        # a text encoder saved from its causal-LM wrapper stores its layers under "model."
        entry = entries.get(name) or entries.get("model." + name)
        if entry is None:
            raise ModelLoadError(
                f"{component}: {name} is not in the checkpoint's files any more; cannot restore the weight it had "
                "before the LoRA (reload the model)"
            )
        return entry

    def _component(self, component: str) -> Mapping[str, TensorEntry]:
        if component not in self._entries:
            paths = self._layout.weight_paths(component)
            self._entries[component] = {entry.name: entry for path in paths for entry in read_safetensors_header(path)}
        return self._entries[component]
