"""Resolve a model name to a complete local folder: a local path, a Hugging Face or ModelScope cache, or a
download.

Order for ``source="auto"``:

1. ``model`` is an existing folder: use it.
2. The Hugging Face cache, then the ModelScope cache (no network).
3. Unless offline: download from Hugging Face, and if that fails, from ModelScope.

ModelScope's client is an extra (``pip install 'zimage-turbo[modelscope]'``). Without it, ``source="auto"``
uses Hugging Face only (the message of a failure says so), and ``source="modelscope"`` raises
:class:`~zimage_turbo.errors.ModelScopeNotInstalledError`.

Cache folders are worked out when :func:`resolve_model` runs, not when a hub client is imported, so
``HF_HOME`` / ``MODELSCOPE_CACHE`` set by a script after its imports are still honoured (the
background scripts set them that way). Every folder is checked with
:func:`~zimage_turbo.layout.check_pipeline_dir` before it is returned.

Before downloading, the hub is asked for the size of every file we would fetch; what the cache already holds
is subtracted, and if the rest (plus a margin) exceeds the free space of the cache's disk, nothing is fetched
and :class:`~zimage_turbo.errors.NotEnoughDiskSpaceError` says how much is needed and free. Downloads and
their resumption are the hub clients' own: files already complete in the cache are never fetched again;
ModelScope resumes a partly fetched file from its ``.incomplete`` copy, while huggingface_hub (1.x and
later) retries a broken transfer from where it stopped within the same run but starts a file over in a new
process.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import (
    DownloadError,
    IncompleteModelError,
    ModelNotFoundError,
    ModelScopeNotInstalledError,
    NotEnoughDiskSpaceError,
    first_line,
)
from .hub_reach import unreachable
from .layout import PipelineLayout, check_pipeline_dir
from .settings import ZImageSettings

__all__ = [
    "DISK_MARGIN_BYTES",
    "REPO_ID",
    "RemoteFile",
    "ResolvedModel",
    "bytes_to_fetch",
    "check_disk_space",
    "free_disk_bytes",
    "huggingface_cache_dir",
    "is_offline",
    "modelscope_cache_dir",
    "modelscope_installed",
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
# Free space to leave beyond the files themselves: the clients' temporary files and lock files, and room for
# the rest of the system to keep working.
DISK_MARGIN_BYTES = 2**30
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ResolvedModel:
    """A complete model folder and where it came from (``local``, ``huggingface`` or ``modelscope``).

    ``name`` is the repo id, or for a local folder its last part (what saved images record: never a whole
    path of this machine). ``revision`` is the commit of a Hugging Face snapshot, else the revision the
    settings asked for (None: unknown).
    """

    path: Path
    source: str
    layout: PipelineLayout
    downloaded: bool = False
    name: str = ""
    revision: str | None = None


@dataclass(frozen=True)
class RemoteFile:
    """One file of a hub repo: its path in the repo, its size, and the name the Hugging Face cache stores its
    content under (the LFS sha256 or the git blob id; None where unknown)."""

    name: str
    size: int
    etag: str | None = None


def bytes_to_fetch(remote: Iterable[RemoteFile], present: Mapping[str, int]) -> int:
    """Bytes a download still has to fetch: each file's size less what of it is already on disk (``present``
    maps a file to its bytes on disk: complete, or a partial copy the client will resume)."""
    return sum(max(file.size - max(present.get(file.name, 0), 0), 0) for file in remote)


def check_disk_space(
    needed_bytes: int,
    free_bytes: int,
    folder: Path,
    *,
    what: str = "the model",
    margin_bytes: int = DISK_MARGIN_BYTES,
) -> None:
    """Refuse (:class:`~zimage_turbo.errors.NotEnoughDiskSpaceError`) a download of ``needed_bytes`` into
    ``folder``, whose disk has ``free_bytes`` free, unless ``margin_bytes`` would still be left."""
    if needed_bytes + margin_bytes <= free_bytes:
        return
    raise NotEnoughDiskSpaceError(
        f"Not enough disk space to download {what}: {needed_bytes / 1e9:.2f} GB still to fetch (files already "
        f"in the cache not counted) plus a {margin_bytes / 1e9:.2f} GB margin, but {folder} has only "
        f"{free_bytes / 1e9:.2f} GB free. Free some space, or point ZIMAGE_CACHE_DIR (or HF_HOME / "
        "MODELSCOPE_CACHE) at a disk with more room.",
        needed_bytes=needed_bytes,
        free_bytes=free_bytes,
        folder=str(folder),
    )


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds ``folder`` (or would: its nearest existing parent is asked)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage(Path.cwd()).free


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
        return ResolvedModel(
            path=local, source="local", layout=check_pipeline_dir(local), name=local.resolve().name or str(local)
        )
    if not REPO_ID.match(name):
        raise ModelNotFoundError(
            f"{name!r} is neither an existing folder nor a repo id of the form 'owner/name'.", searched=[name]
        )

    hubs: list[str] = ["huggingface", "modelscope"] if settings.source == "auto" else [settings.source]
    searched: list[str] = []
    incomplete: IncompleteModelError | None = None
    for hub in list(hubs):
        # Checked only here, so that a model found in the Hugging Face cache never imports ModelScope.
        if hub == "modelscope" and not modelscope_installed():
            if settings.source == "modelscope":
                raise ModelScopeNotInstalledError(
                    f"source='modelscope' needs ModelScope's client, which is not installed: pip install "
                    f"'zimage-turbo[{ModelScopeNotInstalledError.extra}]' (or use source='huggingface' or 'auto')"
                )
            hubs.remove(hub)
            searched.append(_MODELSCOPE_MISSING)
            continue
        folder, note = _find_in_cache(hub, settings)
        searched.append(note)
        if folder is None:
            continue
        try:
            return ResolvedModel(
                path=folder,
                source=hub,
                layout=check_pipeline_dir(folder),
                name=name,
                revision=_revision(folder, settings.revision),
            )
        except IncompleteModelError as exc:
            # A partial download: downloading again below fills it in (the hub clients skip complete files).
            logger.warning("cached copy in %s is incomplete: %s", folder, ", ".join(exc.missing))
            incomplete = incomplete or exc

    if is_offline(settings):
        if incomplete is not None:
            raise incomplete
        raise ModelNotFoundError(_not_found_message(name, searched), searched=searched)
    return _download(name, hubs, settings, skipped=[note for note in searched if note == _MODELSCOPE_MISSING])


def modelscope_installed() -> bool:
    """Whether ModelScope's client can be imported (it is the ``modelscope`` extra). Imports it: about two
    seconds, paid only when ModelScope is about to be used anyway."""
    try:
        import modelscope  # noqa: F401
    except ImportError:
        return False
    return True


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


def _download(name: str, hubs: list[str], settings: ZImageSettings, *, skipped: Iterable[str] = ()) -> ResolvedModel:
    failures: list[str] = list(skipped)
    last: Exception | None = None
    for hub in hubs:
        cache, _ = _CACHE_DIRS[hub](settings)
        reason = unreachable(hub)
        if reason:  # fail now rather than after the client's retries
            failures.append(f"{_HUB_TITLES[hub]}: {reason}")
            continue
        logger.info("downloading %s from %s into %s", name, _HUB_TITLES[hub], cache)
        try:
            _check_room(hub, name, settings.revision, cache)
            folder = _HUB_LOOKUPS[hub](name, settings.revision, cache, False)
            return ResolvedModel(
                path=folder,
                source=hub,
                layout=check_pipeline_dir(folder),
                downloaded=True,
                name=name,
                revision=_revision(folder, settings.revision),
            )
        except (IncompleteModelError, NotEnoughDiskSpaceError):
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


def _revision(folder: Path, asked: str | None) -> str | None:
    """The commit of a Hugging Face cache snapshot (``.../snapshots/<commit>``), else the revision asked for."""
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.name
    return asked


def _check_room(hub: str, repo_id: str, revision: str | None, cache: Path) -> None:
    """Refuse a download that would not fit on the cache's disk, before any byte is fetched."""
    try:
        remote = [file for file in _REMOTE_FILES[hub](repo_id, revision) if _wanted(file.name)]
    except (ConnectionError, TimeoutError):
        # The hub cannot be reached. Its client lists the same files first and would fail the same way, after
        # the same retries (seconds, for ModelScope): report this as the hub's failure instead.
        raise
    except Exception as exc:  # no such repo, no token, a mirror without this API...: the client says it better
        logger.debug("could not list the files of %s on %s to check disk space: %s", repo_id, hub, exc)
        return
    present = _PRESENT_FILES[hub](remote, cache, repo_id)
    needed = bytes_to_fetch(remote, present)
    logger.info("%s: %.2f GB to fetch from %s", repo_id, needed / 1e9, _HUB_TITLES[hub])
    check_disk_space(needed, free_disk_bytes(cache), cache, what=f"{repo_id} from {_HUB_TITLES[hub]}")


def _wanted(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in DOWNLOAD_PATTERNS)


def _huggingface_files(repo_id: str, revision: str | None) -> list[RemoteFile]:
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    files = []
    for sibling in info.siblings or ():
        if sibling.size is None:
            continue
        etag = sibling.lfs.sha256 if sibling.lfs is not None else sibling.blob_id
        files.append(RemoteFile(sibling.rfilename, int(sibling.size), etag))
    return files


def _huggingface_present(files: Iterable[RemoteFile], cache: Path, repo_id: str) -> dict[str, int]:
    """Files already complete in the Hugging Face cache: its blobs are named by content (the etag). Partial
    downloads do not count: huggingface_hub >= 1.0 starts an interrupted file over in a new process."""
    blobs = cache / ("models--" + repo_id.replace("/", "--")) / "blobs"
    present = {}
    for file in files:
        blob = blobs / file.etag if file.etag else None
        if blob is not None and blob.is_file() and blob.stat().st_size == file.size:
            present[file.name] = file.size
    return present


def _modelscope_files(repo_id: str, revision: str | None) -> list[RemoteFile]:
    from modelscope.hub.api import HubApi

    entries = HubApi().get_model_files(repo_id, revision=revision, recursive=True)
    return [
        RemoteFile(str(entry["Path"]), int(entry["Size"]))
        for entry in entries
        if entry.get("Type", "blob") != "tree" and entry.get("Size") is not None
    ]


def _modelscope_present(files: Iterable[RemoteFile], cache: Path, repo_id: str) -> dict[str, int]:
    """Bytes of each file already in a ModelScope cache (any of its layouts), counting the ``.incomplete``
    copy of a partly fetched file, which ModelScope resumes."""
    owner, name = repo_id.split("/", 1)
    roots = [
        *sorted((cache / "models" / f"{owner}--{name}" / "snapshots").glob("*")),
        cache / "models" / owner / name.replace(".", "___"),
        cache / owner / name,
    ]
    present: dict[str, int] = {}
    for file in files:
        for root in roots:
            complete, partial = root / file.name, root / (file.name + ".incomplete")
            # A file of another size at the final path is fetched again from scratch; a partial copy is resumed.
            have = file.size if complete.is_file() and complete.stat().st_size == file.size else 0
            if not have and partial.is_file() and partial.stat().st_size <= file.size:
                have = partial.stat().st_size
            present[file.name] = max(present.get(file.name, 0), have)
    return present


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


_MODELSCOPE_MISSING = (
    f"ModelScope: not tried, its client is not installed (pip install "
    f"'zimage-turbo[{ModelScopeNotInstalledError.extra}]')"
)
_HUB_TITLES = {"huggingface": "Hugging Face", "modelscope": "ModelScope"}
_HUB_LOOKUPS: dict[str, Callable[[str, str | None, Path, bool], Path]] = {
    "huggingface": _huggingface_snapshot,
    "modelscope": _modelscope_snapshot,
}
_CACHE_DIRS: dict[str, Callable[[ZImageSettings], tuple[Path, str]]] = {
    "huggingface": huggingface_cache_dir,
    "modelscope": modelscope_cache_dir,
}
# The only network calls of the disk-space check: the file list with sizes. Tests replace these.
_REMOTE_FILES: dict[str, Callable[[str, str | None], list[RemoteFile]]] = {
    "huggingface": _huggingface_files,
    "modelscope": _modelscope_files,
}
_PRESENT_FILES: dict[str, Callable[[Iterable[RemoteFile], Path, str], dict[str, int]]] = {
    "huggingface": _huggingface_present,
    "modelscope": _modelscope_present,
}
