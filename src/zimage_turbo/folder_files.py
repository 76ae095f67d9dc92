"""Reading the files of a model folder for its check: each problem is collected with the file it is about
(relative to the folder), so that :func:`~zimage_turbo.layout.check_pipeline_dir` can report them all at once."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["Problems", "file_problem", "read_json"]

# (file relative to the root, what is wrong with it)
Problems = list[tuple[str, str]]


def file_problem(path: Path) -> str | None:
    """What keeps ``path`` from being read as a file (None if nothing does). A Hugging Face cache snapshot
    holds links to blobs: a link whose blob was deleted is an incomplete download, not a missing file."""
    if path.is_file():
        return None
    if path.is_symlink():
        return f"a broken link (its target {os.readlink(path)} is gone): an incomplete download"
    if path.exists():
        return "not a file"
    return "missing"


def read_json(path: Path, problems: Problems, name: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None after adding to ``problems`` why it cannot be had."""
    problem = file_problem(path)
    if problem is not None:
        problems.append((name, problem))
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON, a huge number
        problems.append((name, f"unreadable: {exc}"))
        return None
    if not isinstance(data, dict):
        problems.append((name, "not a JSON object"))
        return None
    return data
