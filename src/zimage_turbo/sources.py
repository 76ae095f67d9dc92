"""Resolve a model name to a complete local folder: a local path, a Hugging Face or ModelScope cache, or a
download.

Order for ``source="auto"``:

1. ``model`` is an existing folder: use it.
2. The Hugging Face cache, then the ModelScope cache (no network).
3. Unless offline: download from Hugging Face, and if that fails, from ModelScope.

Cache folders are worked out when :func:`resolve_model` runs, not when a hub client is imported, so
``HF_HOME`` / ``MODELSCOPE_CACHE`` set by a script after its imports are still honoured (the
background scripts set them that way). Every folder is checked with
:func:`~zimage_turbo.layout.check_pipeline_dir` before it is returned.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError, IncompleteModelError, ModelNotFoundError, first_line
from .layout import PipelineLayout, check_pipeline_dir
from .settings import ZImageSettings

__all__ = [
    "ResolvedModel",
    "huggingface_cache_dir",
    "is_offline",
    "modelscope_cache_dir",
    "resolve_model",
]

logger = logging.getLogger(__name__)

# Only what the pipeline loads: the hub repos also hold READMEs, sample images and sometimes pickles.
DOWNLOAD_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    *(
        f"{component}/*.{ext}"
        for component in ("text_encoder", "transformer", "vae")
        for ext in ("json", "safetensors")
    ),
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ResolvedModel:
    """A complete model folder and where it came from (``local``, ``huggingface`` or ``modelscope``)."""

    path: Path
    source: str
    layout: PipelineLayout
    downloaded: bool = False


def is_offline(settings: ZImageSettings) -> bool:
    """Offline if the settings say so or ``HF_HUB_OFFLINE`` is set to a true value."""
    return settings.offline or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def huggingface_cache_dir(settings: ZImageSettings) -> tuple[Path, str]:
    """The Hugging Face hub cache and what decided it (for messages)."""
    if settings.cache_dir is not None:
        return settings.cache_dir / "hub", "ZIMAGE_CACHE_DIR/hub"
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser(), "HF_HUB_CACHE"
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub", "HF_HOME/hub"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "huggingface" / "hub", "default"


def modelscope_cache_dir(settings: ZImageSettings) -> tuple[Path, str]:
    """The ModelScope cache root and what decided it (for messages)."""
    if settings.cache_dir is not None:
        return settings.cache_dir, "ZIMAGE_CACHE_DIR"
    if os.environ.get("MODELSCOPE_CACHE"):
        return Path(os.environ["MODELSCOPE_CACHE"]).expanduser(), "MODELSCOPE_CACHE"
    return Path.home() / ".cache" / "modelscope", "default"


def resolve_model(settings: ZImageSettings) -> ResolvedModel:
    """Find (or download) the model named by ``settings`` and check that it is complete.

    Raises :class:`~zimage_turbo.errors.ModelNotFoundError` when it is nowhere and may not be
    downloaded, :class:`~zimage_turbo.errors.IncompleteModelError` when a folder lacks files, and
    :class:`~zimage_turbo.errors.DownloadError` when every hub failed.
    """
    name = settings.model
    local = Path(name).expanduser()
    if settings.source == "local" or (settings.source == "auto" and local.is_dir()):
        if not local.is_dir():
            raise ModelNotFoundError(f"Local model folder {str(local)!r} does not exist.", searched=[str(local)])
        return ResolvedModel(path=local, source="local", layout=check_pipeline_dir(local))
    if not _REPO_ID.match(name):
        raise ModelNotFoundError(
            f"{name!r} is neither an existing folder nor a repo id of the form 'owner/name'.", searched=[name]
        )

    hubs: list[str] = ["huggingface", "modelscope"] if settings.source == "auto" else [settings.source]
    searched: list[str] = []
    incomplete: IncompleteModelError | None = None
    for hub in hubs:
        folder, note = _find_in_cache(hub, settings)
        searched.append(note)
        if folder is None:
            continue
        try:
            return ResolvedModel(path=folder, source=hub, layout=check_pipeline_dir(folder))
        except IncompleteModelError as exc:
            # A partial download: downloading again below fills it in (the hub clients skip complete files).
            logger.warning("cached copy in %s is incomplete: %s", folder, ", ".join(exc.missing))
            incomplete = incomplete or exc

    if is_offline(settings):
        if incomplete is not None:
            raise incomplete
        raise ModelNotFoundError(_not_found_message(name, searched), searched=searched)
    return _download(name, hubs, settings)


def _find_in_cache(hub: str, settings: ZImageSettings) -> tuple[Path | None, str]:
    """Look up the model in one hub's cache without touching the network: (folder or None, what we searched)."""
    lookup = _HUB_LOOKUPS[hub]
    cache, origin = _CACHE_DIRS[hub](settings)
    label = f"{_HUB_TITLES[hub]} cache {cache} (from {origin})"
    try:
        return lookup(settings.model, settings.revision, cache, True), label
    except Exception as exc:  # each client has its own "not cached" errors; the reason goes into the message
        logger.debug("%s: %s", label, exc)
        return None, f"{label}: {first_line(exc)}"


def _download(name: str, hubs: list[str], settings: ZImageSettings) -> ResolvedModel:
    failures: list[str] = []
    last: Exception | None = None
    for hub in hubs:
        cache, _ = _CACHE_DIRS[hub](settings)
        logger.info("downloading %s from %s into %s", name, _HUB_TITLES[hub], cache)
        try:
            folder = _HUB_LOOKUPS[hub](name, settings.revision, cache, False)
            return ResolvedModel(path=folder, source=hub, layout=check_pipeline_dir(folder), downloaded=True)
        except IncompleteModelError:
            raise
        except Exception as exc:  # network, auth, missing repo...: try the next hub, report all at the end
            failures.append(f"{_HUB_TITLES[hub]}: {type(exc).__name__}: {first_line(exc)}")
            last = exc
    raise DownloadError(
        f"Could not download {name!r}.\n  "
        + "\n  ".join(failures)
        + "\nCheck the network (or a mirror: HF_ENDPOINT / MODELSCOPE_ENDPOINT), the repo name and revision, "
        "and your token for gated repos; or pass a local folder as the model."
    ) from last


def _not_found_message(name: str, searched: list[str]) -> str:
    return (
        f"Model {name!r} was not found in any cache, and offline mode forbids downloading it.\n"
        "Searched:\n  " + "\n  ".join(searched) + "\n"
        "To fix: go online (unset ZIMAGE_OFFLINE and HF_HUB_OFFLINE); or point ZIMAGE_CACHE_DIR, HF_HOME or "
        "MODELSCOPE_CACHE at the folder that holds the downloaded model (set it before starting Python, or "
        "pass cache_dir=); or pass the model's own folder as the model."
    )


def _huggingface_snapshot(repo_id: str, revision: str | None, cache: Path, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    # cache_dir is passed explicitly: huggingface_hub reads HF_HOME once, at import, which may be too early.
    folder = snapshot_download(
        repo_id,
        revision=revision,
        cache_dir=cache,
        local_files_only=local_only,
        allow_patterns=DOWNLOAD_PATTERNS,
    )
    return Path(str(folder))


def _modelscope_snapshot(repo_id: str, revision: str | None, cache: Path, local_only: bool) -> Path:
    # Imported on demand: modelscope takes about two seconds to import.
    from modelscope import snapshot_download

    # modelscope finds its own older cache layouts (flat <cache>/<owner>/<name>, <cache>/hub/...) itself.
    folder = snapshot_download(
        repo_id,
        revision=revision,
        cache_dir=str(cache),
        local_files_only=local_only,
        allow_patterns=DOWNLOAD_PATTERNS,
    )
    return Path(str(folder))


_HUB_TITLES = {"huggingface": "Hugging Face", "modelscope": "ModelScope"}
_HUB_LOOKUPS: dict[str, Callable[[str, str | None, Path, bool], Path]] = {
    "huggingface": _huggingface_snapshot,
    "modelscope": _modelscope_snapshot,
}
_CACHE_DIRS: dict[str, Callable[[ZImageSettings], tuple[Path, str]]] = {
    "huggingface": huggingface_cache_dir,
    "modelscope": modelscope_cache_dir,
}
