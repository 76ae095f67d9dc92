"""Progress bars: the class every bar of the library uses, and the libraries' own bars turned off.

``tqdm.auto`` picks the notebook widget inside Jupyter, but when ipywidgets is not installed it warns
("IProgress not found. Please update jupyter and ipywidgets.") every time a bar is made, before falling back to
the text bar. Without ipywidgets we use the text bar (``tqdm.std``) directly: it works in a notebook too.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

__all__ = ["library_progress_bars", "tqdm_class"]


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


@contextlib.contextmanager
def library_progress_bars(*, enabled: bool) -> Iterator[None]:
    """Turn the progress bars of diffusers, transformers and huggingface_hub off for the duration (e.g. the
    "Writing model shards" bar of make-checkpoint), if asked; then leave each as it was."""
    if enabled:
        yield
        return
    import importlib

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # (the module: huggingface_hub.utils.tqdm, as an attribute, is the hub's tqdm class)
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")

    was_diffusers = diffusers_logging.is_progress_bar_enabled()
    was_transformers = transformers_logging.is_progress_bar_enabled()
    was_hub = dict(hub_tqdm.progress_bar_states)  # the hub's switches, global and per group
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # the hub's too
    try:
        yield
    finally:
        if was_diffusers:
            diffusers_logging.enable_progress_bar()
        if was_transformers:
            transformers_logging.enable_progress_bar()
        hub_tqdm.progress_bar_states.clear()
        hub_tqdm.progress_bar_states.update(was_hub)
