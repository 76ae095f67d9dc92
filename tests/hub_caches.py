"""Lay out a model folder the way the hubs' clients store downloads, so that tests exercise the real
cache lookups of huggingface_hub and modelscope (no network, no mocks)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def huggingface_cache(source: Path, cache: Path, repo_id: str, *, ref: str = "main", commit: str = COMMIT) -> Path:
    """huggingface_hub's layout: models--owner--name/{blobs/<hash>, snapshots/<commit>/<file> -> blob, refs/<ref>}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    snapshot = repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.rglob("*")):
        if not file.is_file():
            continue
        relative = file.relative_to(source)
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blobs / digest)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / digest, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def modelscope_cache(source: Path, cache: Path, repo_id: str, *, layout: str) -> Path:
    """ModelScope layouts: "snapshots" (modelscope >= 1.38), "models" (1.2x-1.37), "flat" (MODELSCOPE_CACHE set,
    older releases, as in the background articles)."""
    owner, name = repo_id.split("/")
    folder = {
        "snapshots": cache / "models" / f"{owner}--{name}" / "snapshots" / "master",
        "models": cache / "models" / owner / name.replace(".", "___"),
        "flat": cache / owner / name,
    }[layout]
    shutil.copytree(source, folder)
    return folder
