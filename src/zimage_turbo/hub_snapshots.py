"""Fetch the wanted files of a small hub repo (a LoRA's, a ControlNet's): the caches first, then a download.

The model itself is found by :mod:`~zimage_turbo.sources`, which also checks disk space and the whole pipeline
folder. A LoRA or a ControlNet repo is looked up more simply: for each hub in turn, its cache without touching
the network, then, unless offline, a download of only the files that match the caller's patterns (such repos
often also hold sample images and pickles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import first_line
from .hub_reach import unreachable
from .settings import ZImageSettings
from .sources import huggingface_cache_dir, is_offline, modelscope_cache_dir, modelscope_installed

if TYPE_CHECKING:
    import logging

__all__ = ["snapshot_from_hubs"]


def snapshot_from_hubs(
    repo_id: str,
    settings: ZImageSettings,
    *,
    hubs: Sequence[str],
    patterns: list[str],
    check: Callable[[Path], None],
    label: str,
    not_found: Callable[[str], Exception],
    log: logging.Logger,
) -> Path:
    """The folder of ``repo_id`` holding its files that match ``patterns``: from the first of ``hubs`` whose
    cache has it, else downloaded from the first that gives it, unless offline (ModelScope only when its client
    is installed). ``check`` raises for a folder that lacks what the caller needs, which then counts as not
    found there. Each failed attempt is logged (debug) to ``log``, the caller's logger. When no hub has it,
    raises ``not_found(message)``, the message naming the repo as ``label``'s and every attempt."""
    hubs = [hub for hub in hubs if hub != "modelscope" or modelscope_installed()]
    tried = []
    for local_only in (True, False):
        if not local_only and is_offline(settings):
            break
        where = "cache" if local_only else "download"
        for hub in hubs:
            reason = "" if local_only else unreachable(hub)
            if reason:  # fail now rather than after the client's retries
                tried.append(f"{hub} {where}: {reason}")
                continue
            try:
                folder = _snapshot(hub, repo_id, settings, patterns, local_only)
                check(folder)
                return folder
            except Exception as exc:  # each client has its own "not cached" / network errors
                tried.append(f"{hub} {where}: {type(exc).__name__}: {first_line(exc)}")
                log.debug("%s %s: %s", label, repo_id, tried[-1])
    offline = " (offline: nothing was downloaded)" if is_offline(settings) else ""
    raise not_found(f"{label} repo {repo_id!r} was not found{offline}.\n  " + "\n  ".join(tried))


def _snapshot(hub: str, repo_id: str, settings: ZImageSettings, patterns: list[str], local_only: bool) -> Path:
    if hub == "modelscope":
        from modelscope import snapshot_download as modelscope_download

        cache, _ = modelscope_cache_dir(settings)
        folder = modelscope_download(
            repo_id, cache_dir=str(cache), local_files_only=local_only, allow_patterns=patterns
        )
    else:
        from huggingface_hub import snapshot_download

        cache, _ = huggingface_cache_dir(settings)
        folder = snapshot_download(
            repo_id, revision=None, cache_dir=cache, local_files_only=local_only, allow_patterns=patterns
        )
    return Path(str(folder))
