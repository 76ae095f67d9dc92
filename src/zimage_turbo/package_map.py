"""The installed distributions' package map, kept between processes while the environment stays the same.

diffusers asks ``importlib.metadata.packages_distributions()`` while it is imported (transformers did too,
before 5.x). The answer maps import names to the distributions that provide them, and to get it Python reads the
file list of every installed distribution: 0.6 s on the H200 machine's environment (208 distributions), in every
process that loads the model. :mod:`~zimage_turbo.quiet_imports` asks here instead during a load's imports.

The map is kept in the library's cache folder with a fingerprint of what it was read from: the Python version
and, for each folder on ``sys.path`` that has any, in path order, the names and modification times of the
distributions' metadata entries (``*.dist-info``, ``*.egg-info``). Installing, upgrading or removing a
distribution creates, rewrites or removes such an entry, so the fingerprint no longer matches and the map is
read again (a few milliseconds of directory listing decide). Programs started from different folders share the
map. The finders that list distributions are part of the fingerprint: Python's path finder, and the
``importlib_metadata`` backport's once something imports it. An environment with any other such finder on
``sys.meta_path`` keeps nothing: its answer may not come from those folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from .json_files import replace_json
from .settings import library_cache_dir

__all__ = ["PACKAGE_MAP_FILE", "environment_fingerprint", "kept_packages_distributions", "package_map_file"]

logger = logging.getLogger(__name__)

PACKAGE_MAP_FILE = "package-map.json"
_METADATA_SUFFIXES = (".dist-info", ".egg-info")
# Finders that list distributions from the folders on sys.path, as Python's own does (the importlib_metadata
# backport adds its own to sys.meta_path once anything imports it: Jupyter's stack does).
_PATH_FINDERS = ("_frozen_importlib_external.PathFinder", "importlib_metadata.MetadataPathFinder")

PackageMap = Mapping[str, list[str]]


def package_map_file(cache_root: Path | None) -> Path:
    """Where the map is kept: ``<cache_dir>/package-map.json``, or under ``~/.cache/zimage-turbo``."""
    return library_cache_dir(cache_root) / PACKAGE_MAP_FILE


def environment_fingerprint() -> str | None:
    """A digest of where ``importlib.metadata`` finds distributions and of their metadata entries, or None
    where other finders may add distributions (nothing is kept then)."""
    finders: list[str] = []
    for finder in sys.meta_path:
        if hasattr(finder, "find_distributions"):
            name = f"{getattr(finder, '__module__', '?')}.{getattr(finder, '__qualname__', type(finder).__qualname__)}"
            if name not in _PATH_FINDERS:
                return None
            finders.append(name)
    # Only folders holding metadata entries count (in path order, which orders the answer's lists): programs
    # started from different folders share the map, and an entry appearing in any folder changes the digest.
    parts: list[object] = [sys.version, finders]
    for entry in sys.path:
        folder = os.path.abspath(entry or ".")
        try:
            if not os.path.isdir(folder):
                stat = os.stat(folder)  # a zip on the path
                parts.append([folder, stat.st_mtime_ns, stat.st_size])
                continue
            with os.scandir(folder) as listing:
                found = sorted(
                    (item.name, item.stat().st_mtime_ns) for item in listing if item.name.endswith(_METADATA_SUFFIXES)
                )
        except OSError:
            continue  # missing now: if it appears with distributions, they change the digest
        if found:
            parts.append([folder, found])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def kept_packages_distributions(path: Path, scan: Callable[[], PackageMap]) -> PackageMap:
    """``scan()``'s answer (``importlib.metadata.packages_distributions``), from ``path`` when it was kept there
    for this environment's fingerprint; otherwise scanned and kept there (where the folder can be written)."""
    fingerprint = environment_fingerprint()
    if fingerprint is None:
        return scan()
    kept = _read(path, fingerprint)
    if kept is not None:
        return kept
    answer = scan()
    replace_json(
        path,
        {"fingerprint": fingerprint, "map": {name: list(dists) for name, dists in answer.items()}},
        what="the installed distributions' package map",
    )
    return answer


def _read(path: Path, fingerprint: str) -> dict[str, list[str]] | None:
    """The map kept at ``path`` for ``fingerprint``; None if there is none, it is for another environment or it
    is damaged (then it is read again and replaced)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
        return None
    kept = data.get("map")
    if not isinstance(kept, dict) or not all(
        isinstance(name, str) and isinstance(dists, list) and all(isinstance(d, str) for d in dists)
        for name, dists in kept.items()
    ):
        logger.debug("the package map kept in %s is damaged: reading the distributions again", path)
        return None
    return kept
