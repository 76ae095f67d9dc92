"""Cheap previews of latents, for step callbacks: a fixed linear map of the 16 latent channels to RGB.

The VAE would give the true image but costs as much as a decode per step. A preview instead mixes the
latent channels into red, green and blue with fixed weights, stretches the result to the full 0-255 range
and scales it up: a few milliseconds on a CPU, and no model. It shows where the shapes are and how the
image settles over the steps; its colours are approximate.

The default weights are generic, not calibrated on Z-Image's VAE (the 16-channel VAE it shares with Flux):
channel ``c`` is given the hue ``c/16`` of a colour wheel, so every channel is visible and neighbouring
channels get related colours. A calibrated table (16 rows of R, G, B weights, for example a least-squares fit
of decoded images against their latents) can be passed as ``weights``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .errors import InvalidRequestError

__all__ = ["LATENT_CHANNELS", "generic_weights", "preview_image"]

#: channels of Z-Image's latents (the Flux VAE's)
LATENT_CHANNELS = 16


def generic_weights(channels: int = LATENT_CHANNELS) -> torch.Tensor:
    """A ``(channels, 3)`` table giving channel ``c`` the colour at angle ``2*pi*c/channels`` of a hue wheel
    (red at 0, green at a third of a turn, blue at two thirds), scaled so that the columns sum to about 1."""
    rows = []
    for c in range(channels):
        angle = 2 * math.pi * c / channels
        rows.append([math.cos(angle - k * 2 * math.pi / 3) for k in range(3)])
    return torch.tensor(rows, dtype=torch.float32) * (2 / channels)


def preview_image(
    latents: torch.Tensor, *, size: int = 256, index: int = 0, weights: torch.Tensor | None = None
) -> Image.Image:
    """An RGB preview of image ``index`` of ``latents`` (``(images, 16, h, w)`` or ``(16, h, w)``, as a step
    callback's :attr:`~zimage_turbo.result.StepInfo.latents`), ``size`` pixels on its longer side.

    The latents are only read (the projection runs where they are, in float32; three small planes come back
    to the CPU). The same latents always give the same picture. ``weights``: a ``(16, 3)`` table of each
    channel's red, green and blue weights (default: :func:`generic_weights`, approximate colours).
    """
    if not isinstance(latents, torch.Tensor):
        raise InvalidRequestError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise InvalidRequestError(f"size must be an integer between 8 and 4096 pixels, got {size!r}")
    planes = latents if latents.dim() == 4 else latents.unsqueeze(0)
    if planes.dim() != 4:
        raise InvalidRequestError(f"latents must have the shape (images, channels, h, w), got {tuple(latents.shape)}")
    if not -planes.shape[0] <= index < planes.shape[0]:
        raise InvalidRequestError(f"index {index} is outside the {planes.shape[0]} image(s) of these latents")
    one = planes[index]
    table = generic_weights(one.shape[0]) if weights is None else weights
    if tuple(table.shape) != (one.shape[0], 3):
        raise InvalidRequestError(f"weights must have the shape ({one.shape[0]}, 3), got {tuple(table.shape)}")
    channels, height, width = one.shape
    with torch.no_grad():
        flat = one.detach().float().reshape(channels, -1)
        if flat.device.type == "cpu":
            # NumPy: torch's threaded CPU matmul costs tens of milliseconds here on a busy machine
            rgb = table.detach().float().numpy().T @ flat.numpy()
        else:
            # on the accelerator, where the latents are: three planes come back to the CPU, not sixteen
            rgb = (table.to(device=flat.device, dtype=torch.float32).T @ flat).cpu().numpy()
    low, high = float(rgb.min()), float(rgb.max())
    pixels = ((rgb - low) * (255 / max(high - low, 1e-6)) + 0.5).astype(np.uint8).reshape(3, height, width)
    pixels = np.ascontiguousarray(pixels.transpose(1, 2, 0))
    picture = Image.fromarray(pixels)
    scale = size / max(height, width)
    return picture.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
