"""Which safetensors files hold a component's weights: chosen by name, as diffusers and transformers choose them.

A component's weights are ``diffusion_pytorch_model.safetensors`` (transformer, VAE) or ``model.safetensors``
(text encoder), or their sharded form: ``<name>.safetensors.index.json`` and the shards its ``weight_map``
names. Any other safetensors file in the folder (a LoRA, an fp16 variant, a copy) is not loaded; taking the
first file in name order instead would load whichever sorts first, and a zeroed
``diffusion_pytorch_model.fp16.safetensors`` would change every image without a word.

Variants (``<name>.<variant>.safetensors``, sharded ``<name>.<variant>.safetensors.index.json``) are loaded by
the libraries only when ``variant=`` asks for one. zimage-turbo has no such setting, so the plain files are the
weights, and a folder that holds only variant weights is refused with their names. A folder that holds both
the single file and an index is refused too: diffusers would load the shards, transformers the single file,
and either may be a stale leftover.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .folder_files import Problems, file_problem, read_json

__all__ = ["WEIGHT_NAMES", "choose_weight_files"]

logger = logging.getLogger(__name__)

# component -> the name its weights are saved under (diffusers' and transformers' own names)
WEIGHT_NAMES = {
    "transformer": "diffusion_pytorch_model",
    "text_encoder": "model",
    "vae": "diffusion_pytorch_model",
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def choose_weight_files(root: Path, component: str, problems: Problems, *, stem: str | None = None) -> tuple[str, ...]:
    """The safetensors files holding ``component``'s weights (relative to ``root``, in shard order), or ``()``
    after adding to ``problems`` why there are none that can be used. ``stem``: the weights' name, for a folder
    that is not one of the pipeline's components (a ControlNet's: ``diffusion_pytorch_model``)."""
    folder = root / component
    stem = stem or WEIGHT_NAMES[component]
    single, index = f"{stem}.safetensors", f"{stem}.safetensors.index.json"
    has_single, has_index = os.path.lexists(folder / single), os.path.lexists(folder / index)
    if has_single and has_index:
        problems.append(
            (
                f"{component}/{single}",
                f"present beside {index}: diffusers would load the shards the index names, transformers the "
                "single file; remove the one that is not the model's weights",
            )
        )
        return ()
    if has_index:
        chosen = _shards(root, component, index, problems)
    elif has_single:
        problem = file_problem(folder / single)
        if problem is not None:
            problems.append((f"{component}/{single}", problem))
            return ()
        chosen = (f"{component}/{single}",)
    else:
        problems.append((f"{component}/{single}", _why_missing(folder, stem)))
        return ()
    ignored = sorted(set(_safetensors_names(folder)) - {name.rpartition("/")[2] for name in chosen} - {index})
    if ignored:
        listed = ", ".join(ignored)
        logger.debug("%s: not loading %s (the weights are %s or the shards of %s)", component, listed, single, index)
    return chosen


def _shards(root: Path, component: str, index_name: str, problems: Problems) -> tuple[str, ...]:
    label = f"{component}/{index_name}"
    index = read_json(root / component / index_name, problems, label)
    if index is None:
        return ()
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        problems.append((label, "no weight_map"))
        return ()
    shards: list[str] = []
    for tensor, shard in weight_map.items():
        # A shard name is a plain file name beside the index; anything else could point outside the model.
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            problems.append((label, f"refusing shard name {shard!r} (for {tensor!r}): not a plain file name"))
            return ()
        if shard not in shards:
            shards.append(shard)
    present: list[str] = []
    for shard in shards:
        problem = file_problem(root / component / shard)
        if problem is not None:
            problems.append((f"{component}/{shard}", f"{problem} (named by {index_name})"))
            continue
        present.append(f"{component}/{shard}")
    return tuple(present)


def _why_missing(folder: Path, stem: str) -> str:
    """Why neither the single file nor an index is there, naming what the folder holds instead."""
    sharded = f"{stem}.safetensors.index.json"
    names = _safetensors_names(folder)
    variant = re.compile(
        rf"{re.escape(stem)}(-\d+-of-\d+)?\.[^.]+\.safetensors(\.index\.json)?|{re.escape(stem)}\.safetensors\.index\.[^.]+\.json"
    )
    variants = [name for name in names if variant.fullmatch(name)]
    if variants:
        return (
            f"missing (nor {sharded}); found only the variant weights {', '.join(variants)}: zimage-turbo loads the "
            f"plain {stem}.safetensors or its shards and has no setting that selects a variant"
        )
    orphans = [name for name in names if re.fullmatch(rf"{re.escape(stem)}-\d+-of-\d+\.safetensors", name)]
    if orphans:
        return f"missing; found the shards {', '.join(orphans)} but not {sharded}, the index that lists them"
    if names:
        return (
            f"missing (nor {sharded}); {', '.join(names)} is not loaded: only {stem}.safetensors or the shards of "
            f"{sharded} hold the component's weights"
        )
    pickled = sorted(p.name for p in folder.glob("*") if p.suffix in _PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickled:
        return (
            f"missing; found only pickle files ({', '.join(pickled)}), which zimage-turbo does not load because "
            "loading them can run code"
        )
    return f"missing (nor its sharded form {sharded})"


def _safetensors_names(folder: Path) -> list[str]:
    """Names of the safetensors files and safetensors indexes in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name.endswith(".safetensors") or (".safetensors" in p.name and p.name.endswith(".json"))
    )
