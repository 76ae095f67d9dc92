"""The progress bar class every bar of the library uses.

``tqdm.auto`` picks the notebook widget inside Jupyter, but when ipywidgets is not installed it warns
("IProgress not found. Please update jupyter and ipywidgets.") every time a bar is made, before falling back to
the text bar. Without ipywidgets we use the text bar (``tqdm.std``) directly: it works in a notebook too.
"""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["tqdm_class"]


def tqdm_class() -> Any:
    """``tqdm.auto.tqdm`` when ipywidgets can be imported, else ``tqdm.std.tqdm``."""
    try:
        widgets = importlib.util.find_spec("ipywidgets") is not None
    except (ImportError, ValueError):  # a broken or half-imported installation counts as missing
        widgets = False
    if widgets:
        from tqdm.auto import tqdm as auto

        return auto
    from tqdm.std import tqdm as plain

    return plain
