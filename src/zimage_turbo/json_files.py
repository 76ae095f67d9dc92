"""Small JSON files the library keeps in its cache folder (measured GPU speeds, compile times, attention choices),
replaced whole so that a reader, in this process or another, never sees half of one."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["replace_json"]

logger = logging.getLogger(__name__)


def replace_json(path: Path, data: Any, *, what: str) -> bool:
    """Write ``data`` to ``path`` through a temporary file beside it, then swap it in; False (logged at debug,
    naming ``what``) where the folder cannot be written: a read-only cache only means measuring again."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        logger.debug("could not keep %s in %s: %s", what, path, exc)
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        return False
    return True
