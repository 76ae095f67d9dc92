"""Find the ControlNet the ``controlnet`` setting names, read its config and sizes, and check that it fits the model.

The setting is found like the model and like a LoRA (:mod:`zimage_turbo.lora_sources`):

* a folder in diffusers' layout: ``config.json`` (a ``ZImageControlNetModel``) and
  ``diffusion_pytorch_model.safetensors`` or its shards; or a model folder holding such a folder named
  ``controlnet`` (what ``make_checkpoint(..., controlnet=True)`` writes);
* a single ``.safetensors`` file, as the Z-Image-Turbo Fun ControlNet Union weights are published: its config is
  the ``config.json`` beside it when that describes a ``ZImageControlNetModel``, else it is read off the file's
  tensors (the patch embedder gives the width and the control input's channels, the block names the number of
  control blocks and refiners, as diffusers' single-file loader tells the published versions apart) and the
  transformer's config; the control blocks are placed evenly over the transformer's layers, as the published
  versions place them (``[0, 5, ..., 25]`` for 6 blocks, ``[0, 2, ..., 28]`` for 15);
* a Hugging Face or ModelScope repo id, ``owner/name`` (diffusers' layout) or ``owner/name/file.safetensors``
  (one file of a repo that holds several): the hubs' caches first, without the network, then unless offline a
  download of that file (or of the diffusers layout) and ``config.json`` only.

Nothing here reads weights: :func:`check_controlnet` compares the config with the transformer's and every
tensor's name and shape (from the safetensors headers) with what that config builds, so that a ControlNet of
another architecture is refused (:class:`~zimage_turbo.errors.ControlNetError`) before any weight moves.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import ControlNetError, ControlNetNotFoundError, IncompleteModelError, ModelLoadError, first_line
from .folder_files import Problems, read_json
from .hub_snapshots import snapshot_from_hubs
from .profile import ComponentProfile, component_profile
from .quiet_imports import quiet_imports
from .safetensors_header import TensorEntry, read_safetensors_header
from .settings import ZImageSettings
from .sources import REPO_ID
from .weight_files import choose_weight_files

__all__ = [
    "CONTROLNET_CLASS",
    "ControlNetSource",
    "check_controlnet",
    "find_controlnet",
    "resolve_controlnet",
    "transformer_config",
]

logger = logging.getLogger(__name__)

CONTROLNET_CLASS = "ZImageControlNetModel"
_WEIGHTS = "diffusion_pytorch_model"
_SUBFOLDER = "controlnet"
_BLOCK = re.compile(r"^(control_layers|control_noise_refiner)\.(\d+)\.")
_EMBEDDER = re.compile(r"^control_all_x_embedder\.(\d+)-(\d+)\.weight$")


@dataclass(frozen=True)
class ControlNetSource:
    """A ControlNet found on disk: its weight ``files`` (shards in order), its ``config`` (``ZImageControlNetModel``'s
    arguments, read or worked out), and ``label``, what results and saved images record (the repo id, or the
    folder's or file's name: never a whole path of this machine)."""

    files: tuple[Path, ...]
    config: Mapping[str, Any]
    label: str
    latent_channels: int = 16  # the transformer's (its in_channels)

    def check_task(self, task: str) -> None:
        """Refuse ControlNet inpainting with a ControlNet that has no input for the mask and the masked image
        (``control_in_dim`` must be twice the latent channels and one: the first Union version's 16 is not), as
        ``ZImageControlNetInpaintPipeline`` would, before anything loads."""
        wanted = 2 * self.latent_channels + 1
        if task == "control_inpaint" and self.config.get("control_in_dim") != wanted:
            raise ControlNetError(
                f"ControlNet inpainting (control_image with image and mask_image) needs a ControlNet whose control "
                f"input has {wanted} channels (the Union 2.x ones); controlnet {self.label!r} has "
                f"{self.config.get('control_in_dim')}. Leave out image and mask_image, or use another ControlNet",
                argument="mask_image",
            )

    def entries(self) -> list[TensorEntry]:
        """The tensors of the weight files (headers only) that the config's module takes: diffusers' single-file
        loader drops the ``control_noise_refiner`` of versions whose control blocks refine the noise too."""
        entries = [entry for path in self.files for entry in read_safetensors_header(path)]
        if self.config.get("add_control_noise_refiner") == "control_layers":
            entries = [entry for entry in entries if not entry.name.startswith("control_noise_refiner.")]
        return entries

    def profile(self, dtype_bytes: int) -> ComponentProfile:
        """Its sizes at the run dtype (blocks: the control blocks and control refiners)."""
        shapes = {entry.name: (entry.dtype_name, entry.shape) for entry in self.entries()}
        return component_profile("controlnet", shapes, dtype_bytes)


def resolve_controlnet(settings: ZImageSettings, transformer: Mapping[str, Any]) -> ControlNetSource:
    """The ControlNet ``settings.controlnet`` names, with its config (``transformer``: the model's transformer
    config, for a single file's config). Raises :class:`~zimage_turbo.errors.ControlNetNotFoundError` when there is
    none (offline: without touching the network), :class:`~zimage_turbo.errors.ControlNetError` when what is there
    cannot be a ControlNet."""
    name = settings.controlnet
    if name is None:
        raise ControlNetError(
            "control_image needs a ControlNet: set controlnet= (ZIMAGE_CONTROLNET) to a folder, a .safetensors "
            "file or a repo id (docs/tasks.md)",
            argument="control_image",
        )
    local = Path(name).expanduser()
    if local.exists() or settings.source == "local":
        return _local(local, local.name, transformer)
    repo, _, file = name.partition("/")[2].partition("/")
    repo_id = f"{name.partition('/')[0]}/{repo}"
    if not REPO_ID.match(repo_id) or (file and not file.endswith(".safetensors")):
        raise ControlNetNotFoundError(
            f"controlnet {name!r}: no such file or folder, and not a repo id ('owner/name' or "
            "'owner/name/file.safetensors')"
        )
    folder = _from_hubs(repo_id, file or None, settings)
    return _local(folder / file if file else folder, name, transformer)


def _local(path: Path, label: str, transformer: Mapping[str, Any]) -> ControlNetSource:
    """The ControlNet in ``path``: a file, a folder in diffusers' layout, or a folder holding one named controlnet."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ControlNetError(f"controlnet {label!r} is not a .safetensors file", argument="controlnet")
        return ControlNetSource((path,), _single_file_config(path, transformer), label)
    if not path.is_dir():
        raise ControlNetNotFoundError(f"controlnet {label!r}: there is no file or folder {str(path)!r}")
    folder = path / _SUBFOLDER if not (path / "config.json").is_file() and (path / _SUBFOLDER).is_dir() else path
    if (folder / "config.json").is_file():
        problems: Problems = []
        config = read_json(folder / "config.json", problems, "config.json")
        names = choose_weight_files(folder.parent, folder.name, problems, stem=_WEIGHTS)
        if problems or config is None:
            listing = "; ".join(f"{where}: {what}" for where, what in problems)
            raise ControlNetError(f"controlnet {label!r} cannot be read: {listing}", argument="controlnet")
        return ControlNetSource(tuple(folder.parent / name for name in names), _checked_class(config, label), label)
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(files) != 1:
        found = ", ".join(p.name for p in files[:5]) or "none"
        raise ControlNetError(
            f"controlnet {label!r} has no config.json and {len(files)} .safetensors files ({found}): name the file "
            "(a path, or 'owner/name/file.safetensors' for a repo)",
            argument="controlnet",
        )
    return ControlNetSource((files[0],), _single_file_config(files[0], transformer), f"{label}/{files[0].name}")


def _checked_class(config: Mapping[str, Any], label: str) -> dict[str, Any]:
    named = config.get("_class_name", CONTROLNET_CLASS)
    if named != CONTROLNET_CLASS:
        raise ControlNetError(
            f"controlnet {label!r} is a {named}, not a {CONTROLNET_CLASS} (a ControlNet for another model)",
            argument="controlnet",
        )
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _single_file_config(path: Path, transformer: Mapping[str, Any]) -> dict[str, Any]:
    """The config of a single-file ControlNet: its ``config.json`` neighbour when that is one, else read off its
    tensors (see the module's description)."""
    beside = path.with_name("config.json")
    if beside.is_file():
        try:
            data = json.loads(beside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and data.get("_class_name") == CONTROLNET_CLASS:
            return _checked_class(data, path.name)
    entries = {entry.name: entry for entry in read_safetensors_header(path)}
    embedders = [(m, entries[name]) for name in entries if (m := _EMBEDDER.match(name))]
    if not embedders:
        raise ControlNetError(
            f"controlnet {path.name!r} holds no control_all_x_embedder: not a Z-Image ControlNet",
            argument="controlnet",
        )
    blocks: dict[str, set[int]] = {"control_layers": set(), "control_noise_refiner": set()}
    for name in entries:
        if block := _BLOCK.match(name):
            blocks[block.group(1)].add(int(block.group(2)))
    patches = sorted((int(m.group(1)), int(m.group(2)), entry.shape) for m, entry in embedders)
    patch, frames, shape = patches[0]
    dim, inputs = shape[0], shape[1] // (patch * patch * frames)
    count, refiners = len(blocks["control_layers"]), len(blocks["control_noise_refiner"])
    mode = _refiner_mode(path, entries, refiners)
    layers = int(transformer.get("n_layers", 30))
    # spread evenly from layer 0: [0, 5, ..., 25] for the first version's 6 blocks, [0, 2, ..., 28] for 2.x's 15
    places = list(range(0, layers, max(layers // max(count, 1), 1)))[:count]
    logger.info("controlnet %s has no config: %d control blocks, at layers %s", path.name, count, places)
    transformer_refiners = int(transformer.get("n_refiner_layers", 2))
    return {
        "control_layers_places": places,
        "control_refiner_layers_places": list(range(transformer_refiners)) if mode is not None else None,
        "control_in_dim": inputs,
        "add_control_noise_refiner": mode,
        "all_patch_size": [p for p, _, _ in patches],
        "all_f_patch_size": [f for _, f, _ in patches],
        "dim": dim,
        "n_refiner_layers": refiners or transformer_refiners,
        "n_heads": transformer.get("n_heads", 30),
        "n_kv_heads": transformer.get("n_kv_heads", 30),
        "norm_eps": transformer.get("norm_eps", 1e-5),
        "qk_norm": transformer.get("qk_norm", True),
    }


def _refiner_mode(path: Path, entries: Mapping[str, TensorEntry], refiners: int) -> str | None:
    """diffusers' ``add_control_noise_refiner`` for a single file, decided as its single-file loader decides it:
    control refiners with projections whose input projection is not all zeros refine the control input
    themselves (``"control_noise_refiner"``, version 2.1); all zeros, or no refiners at all, the control blocks do
    (``"control_layers"``, 2.0); refiners without projections are the first version's (None)."""
    projection = entries.get("control_noise_refiner.0.before_proj.weight")
    if projection is not None:
        with path.open("rb") as file:
            file.seek(projection.start)
            data = file.read(projection.nbytes)
        return "control_noise_refiner" if any(data) else "control_layers"
    return None if refiners else "control_layers"


def check_controlnet(source: ControlNetSource, transformer: Mapping[str, Any]) -> None:
    """Refuse (:class:`~zimage_turbo.errors.ControlNetError`, ``argument="controlnet"``) a ControlNet that does not
    fit the transformer whose config is ``transformer``, or whose files do not hold what its config builds. Reads
    headers only."""
    config = dict(source.config)
    label = source.label

    def refuse(why: str) -> ControlNetError:
        return ControlNetError(f"controlnet {label!r} does not fit this model: {why}", argument="controlnet")

    try:
        _check_config(config, transformer, refuse)
    except ControlNetError:
        raise
    except (TypeError, ValueError) as exc:  # values of the wrong kinds in its config
        raise refuse(f"its config is malformed ({type(exc).__name__}: {first_line(exc)})") from None
    expected = _expected_shapes(config, refuse)
    stored = {entry.name: entry.shape for entry in source.entries()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    shapes = sorted(name for name in set(expected) & set(stored) if tuple(expected[name]) != tuple(stored[name]))
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}"] if missing else []
        parts += [f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}"] if unexpected else []
        parts += [f"{name} is {list(stored[name])}, expected {list(expected[name])}" for name in shapes[:3]]
        raise refuse("its weights are not those its config builds: " + "; ".join(parts))


def _check_config(config: Mapping[str, Any], transformer: Mapping[str, Any], refuse: Any) -> None:
    """The ControlNet's config against the transformer's: the same width and heads, patch sizes it has, control
    blocks and refiner hints at layers it has, a control input at least as wide as the latents."""
    for key in ("dim", "n_heads", "n_kv_heads"):
        if config.get(key) != transformer.get(key):
            raise refuse(f"its {key} is {config.get(key)!r}, the transformer's {transformer.get(key)!r}")
    if not set(config.get("all_patch_size") or ()) <= set(transformer.get("all_patch_size") or ()):
        raise refuse(
            f"patch sizes {config.get('all_patch_size')} (the transformer's: {transformer.get('all_patch_size')})"
        )
    layers, refiners = int(transformer.get("n_layers", 0)), int(transformer.get("n_refiner_layers", 0))
    places = list(config.get("control_layers_places") or [])
    if 0 not in places or not all(isinstance(p, int) and 0 <= p < layers for p in places):
        raise refuse(f"control blocks at layers {places}, the transformer has {layers} (the first must be 0)")
    refiner_places = list(config.get("control_refiner_layers_places") or [])
    if config.get("add_control_noise_refiner") is not None and not all(0 <= p < refiners for p in refiner_places):
        raise refuse(f"hints for refiner layers {refiner_places}, the transformer has {refiners}")
    if int(config.get("control_in_dim") or 0) < int(transformer.get("in_channels", 16)):
        raise refuse(f"control_in_dim {config.get('control_in_dim')} is below the latent channels")


def _expected_shapes(config: Mapping[str, Any], refuse: Any) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the ``ZImageControlNetModel`` that ``config`` builds (on the meta device)."""
    import torch

    with quiet_imports():
        from diffusers import ZImageControlNetModel

    try:
        with torch.device("meta"):
            model = ZImageControlNetModel(**config)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise refuse(
            f"its config does not build a {CONTROLNET_CLASS}: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _from_hubs(repo_id: str, file: str | None, settings: ZImageSettings) -> Path:
    """The repo's folder in a hub cache, else downloaded (the file asked for, or the diffusers layout, and
    ``config.json``) unless offline."""
    hubs = ["huggingface", "modelscope"] if settings.source == "auto" else [settings.source]
    patterns = [file, "config.json"] if file else ["config.json", f"{_WEIGHTS}*.safetensors", f"{_WEIGHTS}*.json"]
    return snapshot_from_hubs(
        repo_id,
        settings,
        hubs=hubs,
        patterns=patterns,
        check=lambda folder: _check_has_wanted(folder, repo_id, file),
        label="controlnet",
        not_found=ControlNetNotFoundError,
        log=logger,
    )


def _check_has_wanted(folder: Path, repo_id: str, file: str | None) -> None:
    wanted = folder / file if file else folder / "config.json"
    if not wanted.is_file():
        raise FileNotFoundError(f"{repo_id} has no {wanted.name}" + ("" if file else " (not in diffusers' layout)"))


def transformer_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The transformer's config of a checked model folder."""
    data = json.loads((Path(folder) / "transformer" / "config.json").read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def find_controlnet(settings: ZImageSettings, model_folder: str | os.PathLike[str]) -> ControlNetSource:
    """The ControlNet of ``settings``, found (:func:`resolve_controlnet`) and checked (:func:`check_controlnet`)
    against the transformer of the model in ``model_folder``: headers and configs only."""
    transformer = transformer_config(model_folder)
    try:
        source = resolve_controlnet(settings, transformer)
        check_controlnet(source, transformer)
    except (IncompleteModelError, ModelLoadError) as exc:  # a damaged file (truncated, a malformed header)
        raise ControlNetError(f"controlnet {settings.controlnet!r}: {exc}", argument="controlnet") from None
    return replace(source, latent_channels=int(transformer.get("in_channels", 16)))
