"""Where a placed pipeline computes: its execution device, fixed per placement, and the current CUDA device.

diffusers puts latents, timesteps and token ids on ``pipe._execution_device``, which it works out on every
call by walking the components: the first with an accelerate hook names its hook's device, and a pipeline
without hooks reports its ``device``, the first component in *alphabetical* order that is on a GPU. For
Z-Image that is the text encoder. With the text encoder on one card and the transformer and VAE on another
(``multi_gpu``), diffusers therefore made the latents on the text encoder's card and the transformer's first
layer met a tensor from the wrong GPU (seen on two H200s). The walk also costs milliseconds of host time per
call on the full model.

:func:`pin_execution_device` fixes the answer for one pipeline object: the strategy says where it denoises,
and diffusers' own lookup is used again once the pin is lifted. :func:`on_device` makes a GPU the current
CUDA device while work for it is issued: diffusers' group offloading creates its streams, and waits on
``current_stream()``, on the *current* device, so streaming onto ``cuda:1`` from a thread whose current device
is ``cuda:0`` copied on the wrong card's stream and synchronised the wrong card.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["on_device", "pin_execution_device", "pinned_execution_device"]

_PINNED = "_zimage_turbo_execution_device"
# one subclass per pipeline class (ZImagePipeline, and its image-to-image and inpaint siblings)
_PINNABLE: dict[type, type] = {}


def _pinnable(cls: type) -> type:
    """``cls`` with an ``_execution_device`` that returns the pinned device when there is one."""
    if cls in _PINNABLE.values():
        return cls
    made = _PINNABLE.get(cls)
    if made is None:
        lookup = cls._execution_device  # type: ignore[attr-defined]  # diffusers' property

        def execution_device(pipe: Any) -> torch.device:
            pinned = vars(pipe).get(_PINNED)
            return pinned if pinned is not None else torch.device(lookup.fget(pipe))

        # Same name and module, so that reprs, configs saved by save_pretrained and isinstance checks are unchanged.
        namespace = {
            "_execution_device": property(execution_device, doc=lookup.__doc__),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        }
        made = type(cls.__name__, (cls,), namespace)
        _PINNABLE[cls] = made
    return made


def pin_execution_device(pipe: Any, device: torch.device | None) -> None:
    """Make ``pipe._execution_device`` return ``device`` (None: diffusers' own lookup again)."""
    if device is None:
        vars(pipe).pop(_PINNED, None)
        return
    pipe.__class__ = _pinnable(type(pipe))
    vars(pipe)[_PINNED] = torch.device(device)


def pinned_execution_device(pipe: Any) -> torch.device | None:
    """The device pinned on ``pipe``, or None."""
    return vars(pipe).get(_PINNED)  # type: ignore[no-any-return]


def on_device(device: torch.device | None) -> contextlib.AbstractContextManager[object]:
    """Make ``device`` the current CUDA device inside the block (nothing for other devices)."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
