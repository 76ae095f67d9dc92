"""The ControlNet as a component of the loaded pipeline: read into its host homes, sharing the transformer's
embedders, and found by the strategies that place it.

A ``ZImageControlNetModel`` has weights of its own (its control blocks, control refiners and control patch
embedder) and runs some of the transformer's modules again: the timestep, patch and caption embedders, the
noise and context refiners and the padding tokens. diffusers hands it those with
``ZImageControlNetModel.from_transformer`` (called by the ControlNet pipelines' constructors), which makes them
*registered* submodules and parameters of the ControlNet: its ``parameters()``, ``state_dict()`` and ``to()``
would then take in a good part of the transformer. Every strategy here moves weights per component, so the
ControlNet keeps those modules as plain attributes instead (:func:`share_transformer`): the same objects,
computing exactly as diffusers' do, but owned, counted and moved by the transformer alone.

The loaded ControlNet is the pipeline's attribute ``controlnet`` (not one of its registered components, so that
``pipe.components`` and the image-to-image and inpainting pipelines made from them are unchanged).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .controlnet_sources import ControlNetSource
from .host import HostHomes
from .process_state import default_dtype, exclusive
from .quiet_imports import quiet_imports
from .weights import fill_module

__all__ = ["SHARED_MODULES", "attach_controlnet", "controlnet_of", "load_controlnet", "share_transformer"]

logger = logging.getLogger(__name__)

ATTRIBUTE = "controlnet"
#: what ``ZImageControlNetModel.from_transformer`` takes from the transformer (modules and parameters)
SHARED_MODULES = (
    "t_embedder",
    "all_x_embedder",
    "cap_embedder",
    "noise_refiner",
    "context_refiner",
    "x_pad_token",
    "cap_pad_token",
)


def load_controlnet(
    source: ControlNetSource, *, dtype: torch.dtype, homes: HostHomes, destination: str | torch.device = "homes"
) -> Any:
    """The ControlNet of ``source`` (checked first: :func:`~zimage_turbo.controlnet_sources.check_controlnet`),
    built by diffusers from its config with empty weights and filled from its files in ``dtype`` straight into
    ``destination``: its host homes, or a GPU (as the pipeline's components are, :mod:`zimage_turbo.loader`)."""
    from accelerate import init_empty_weights

    with quiet_imports():
        from diffusers import ZImageControlNetModel

    # exclusive: both contexts change what every thread of the process shares (see process_state.py)
    with exclusive(), init_empty_weights(), default_dtype(dtype):
        model = ZImageControlNetModel(**source.config)
    fill_module(model, source.entries(), dtype=dtype, destination=destination, homes=homes)
    logger.info("loaded the ControlNet %s (%d tensors)", source.label, len(list(model.parameters())))
    return model.eval()


def share_transformer(controlnet: Any, transformer: Any) -> None:
    """Give ``controlnet`` the transformer's embedders and refiners as diffusers' ``from_transformer`` does, but
    as plain attributes: the ControlNet's parameters stay its own (see the module's description). Idempotent, and
    undoes the registration a ControlNet pipeline's constructor makes."""
    for name in SHARED_MODULES:
        controlnet._modules.pop(name, None)
        controlnet._parameters.pop(name, None)
        object.__setattr__(controlnet, name, getattr(transformer, name))
    controlnet.t_scale = transformer.t_scale
    controlnet.rope_embedder = transformer.rope_embedder


def attach_controlnet(pipe: Any, controlnet: Any) -> None:
    """Make ``controlnet`` the pipeline's ControlNet, sharing its transformer's modules."""
    share_transformer(controlnet, pipe.transformer)
    object.__setattr__(pipe, ATTRIBUTE, controlnet)


def controlnet_of(pipe: Any) -> torch.nn.Module | None:
    """The pipeline's ControlNet, or None before one is loaded."""
    found = vars(pipe).get(ATTRIBUTE)
    return found if isinstance(found, torch.nn.Module) else None
