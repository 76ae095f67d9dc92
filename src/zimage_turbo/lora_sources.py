"""Find the file a LoRA source names: a file, a folder holding one, or a Hugging Face / ModelScope repo.

Repos are looked up like the model (:mod:`zimage_turbo.sources`), by :mod:`zimage_turbo.hub_snapshots`: the hubs'
caches first without touching the network, then, unless offline, a download of the safetensors files only (a LoRA
repo often also holds sample images and pickles). A folder or repo with several safetensors files needs
``weight_name``, except when one of them is diffusers' default name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraError, LoraNotFoundError
from .hub_snapshots import snapshot_from_hubs
from .settings import ZImageSettings
from .sources import REPO_ID

__all__ = ["LoraSource", "resolve_lora"]

logger = logging.getLogger(__name__)

# The file name diffusers' save_lora_weights writes: preferred when a folder holds several.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LoraSource:
    """Where a LoRA was found: ``path`` to read it from, and ``label``, what results and saved images record
    (the repo id, or the file's name: never a whole path of this machine)."""

    path: Path
    label: str


def resolve_lora(source: str | os.PathLike[str], *, weight_name: str | None, settings: ZImageSettings) -> LoraSource:
    """The LoRA file ``source`` names. Raises :class:`~zimage_turbo.errors.LoraNotFoundError` when there is
    none, and :class:`~zimage_turbo.errors.LoraError` for a folder whose file is ambiguous."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise LoraError(f"a LoRA source must be a file, a folder or a repo id, got {source!r}")
    if weight_name is not None and (not isinstance(weight_name, str) or not weight_name.strip()):
        raise LoraError(f"weight_name must be a file name, got {weight_name!r}")
    local = Path(source).expanduser()
    if local.is_file():
        if weight_name is not None and weight_name != local.name:
            raise LoraError(f"weight_name={weight_name!r} was given with the file {local.name!r}", path=local.name)
        return LoraSource(local, local.name)
    if local.is_dir():
        path = _pick(local, weight_name, local.name)
        return LoraSource(path, path.name)
    name = str(source)
    if isinstance(source, os.PathLike) or not REPO_ID.match(name):
        raise LoraNotFoundError(f"LoRA {name!r}: no such file or folder, and not a repo id 'owner/name'", path=name)
    folder = _from_hubs(name, weight_name, settings)
    path = _pick(folder, weight_name, name)
    return LoraSource(path, f"{name}/{path.relative_to(folder).as_posix()}")


def _pick(folder: Path, weight_name: str | None, label: str) -> Path:
    """The LoRA file in ``folder``: ``weight_name`` if given, else its only safetensors file (or diffusers'
    default name among several)."""
    if weight_name is not None:
        path = folder / weight_name
        if not path.is_file():
            raise LoraNotFoundError(f"LoRA {label!r} has no file {weight_name!r}", path=label)
        return path
    files = sorted(p for p in folder.rglob("*.safetensors") if p.is_file())
    if len(files) == 1:
        return files[0]
    default = folder / DIFFUSERS_WEIGHT_NAME
    if default.is_file():
        return default
    if not files:
        pickles = sorted(p.name for p in folder.rglob("*") if p.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt"))
        more = f" (it has {', '.join(pickles[:3])}: pickle files, which are not read)" if pickles else ""
        raise LoraNotFoundError(f"LoRA {label!r} holds no .safetensors file{more}", path=label)
    names = ", ".join(p.relative_to(folder).as_posix() for p in files[:5])
    raise LoraError(f"LoRA {label!r} holds several safetensors files ({names}): pass weight_name=", path=label)


def _from_hubs(repo_id: str, weight_name: str | None, settings: ZImageSettings) -> Path:
    """The repo's folder in a hub cache, else downloaded (safetensors only) unless offline."""
    hubs = ["huggingface", "modelscope"] if settings.source in ("auto", "local") else [settings.source]
    return snapshot_from_hubs(
        repo_id,
        settings,
        hubs=hubs,
        patterns=[weight_name] if weight_name else ["*.safetensors"],
        check=lambda folder: _check_has_safetensors(folder, repo_id),
        label="LoRA",
        not_found=lambda message: LoraNotFoundError(message, path=repo_id),
        log=logger,
    )


def _check_has_safetensors(folder: Path, repo_id: str) -> None:
    if not any(folder.rglob("*.safetensors")):
        raise FileNotFoundError(f"no safetensors file in {repo_id}")
