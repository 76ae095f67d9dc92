"""How an image was made, stored inside the image file, and read back.

A PNG written by :meth:`~zimage_turbo.GenerationResult.save` (and so by the CLI and batches) carries two text
chunks:

``zimage-turbo``
    A JSON object: prompt, negative prompt, seed, steps, size, guidance, strategy, quantization, LoRAs
    (name -> scale), dtype, model (name and revision when known) and the library version; for image-to-image
    and inpainting also the task, the strength and the input images' sizes; for ControlNet requests the task,
    the input images' sizes, the control scale and the ControlNet. :func:`read_metadata` returns it.
``parameters``
    The same facts as the one text that AUTOMATIC1111's web UI writes and that many image viewers and
    prompt tools read::

        a red fox in the snow
        Negative prompt: blurry
        Steps: 8, Sampler: Euler, CFG scale: 0, Seed: 7, Size: 1024x768, Model: Tongyi-MAI/Z-Image-Turbo, ...

A ``Software`` chunk names the library and version. No chunk is called ``prompt``: ComfyUI uses that key for
a JSON graph of its own, and its readers would choke on plain text there.

Other formats (JPEG, WebP...) are written without metadata: save PNG to keep it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

__all__ = ["METADATA_KEY", "PARAMETERS_KEY", "parameters_text", "png_info", "read_metadata"]

# Namespaced so that it cannot collide with another tool's chunk.
METADATA_KEY = "zimage-turbo"
PARAMETERS_KEY = "parameters"
# Z-Image-Turbo's scheduler is FlowMatchEulerDiscreteScheduler: "Euler" in the web UI's vocabulary.
SAMPLER = "Euler"


def parameters_text(metadata: Mapping[str, Any]) -> str:
    """The ``parameters`` text (the web UI's format) of the metadata that :meth:`GenerationResult.metadata`
    gives: the prompt, a ``Negative prompt:`` line when there is one, then ``Key: value`` pairs."""
    lines = [str(metadata.get("prompt", ""))]
    negative = metadata.get("negative_prompt")
    if negative:
        lines.append(f"Negative prompt: {negative}")
    pairs: list[tuple[str, object]] = [
        ("Steps", metadata.get("steps")),
        ("Sampler", SAMPLER),
        ("CFG scale", _number(metadata.get("guidance_scale"))),
        ("Seed", metadata.get("seed")),
        ("Size", f"{metadata.get('width')}x{metadata.get('height')}"),
        ("Task", metadata.get("task")),  # image-to-image and inpainting only, as the two below
        ("Denoising strength", _number(metadata.get("strength"))),
        ("Input sizes", _sizes(metadata.get("input_sizes"))),
        ("Control scale", _number(metadata.get("control_scale"))),  # ControlNet requests only, as the one below
        ("ControlNet", metadata.get("controlnet")),
        ("Model", metadata.get("model")),
        ("Model revision", metadata.get("model_revision")),
        ("Strategy", metadata.get("strategy")),
        ("Quantization", metadata.get("quantization")),
        ("LoRAs", _loras(metadata.get("loras"))),
        ("Version", f"zimage-turbo {metadata.get('version')}"),
    ]
    lines.append(", ".join(f"{key}: {_value(value)}" for key, value in pairs if value is not None))
    return "\n".join(lines)


def png_info(metadata: Mapping[str, Any]) -> PngImagePlugin.PngInfo:
    """The PNG text chunks that carry ``metadata`` (UTF-8 ``iTXt`` where the text is not Latin-1)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters_text(metadata))
    info.add_text(METADATA_KEY, json.dumps(dict(metadata), ensure_ascii=False, sort_keys=True))
    info.add_text("Software", f"zimage-turbo {metadata.get('version')}")
    return info


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What :meth:`~zimage_turbo.GenerationResult.save` stored in an image: the JSON object described in
    :mod:`zimage_turbo.image_metadata`, or None when the file is not an image or holds none of ours.

    Only the file's header chunks are read; no pixel is decoded.

    Raises:
        FileNotFoundError: there is no file at ``path`` (and other ``OSError`` when it cannot be read).
    """
    try:
        with Image.open(os.fspath(path)) as image:
            text = image.info.get(METADATA_KEY)
    except UnidentifiedImageError:
        return None
    if not isinstance(text, str):
        return None
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError:
        return None
    return metadata if isinstance(metadata, dict) else None


def _loras(loras: object) -> str | None:
    """``name: scale`` of each LoRA, or None without any."""
    if not isinstance(loras, Mapping) or not loras:
        return None
    return ", ".join(f"{name}: {_number(scale)}" for name, scale in loras.items())


def _number(value: object) -> object:
    """1.0 -> 1, 3.5 -> 3.5: written the way the web UI writes its CFG scale."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _sizes(value: object) -> str | None:
    """``{"image": "640x480", "mask_image": "640x480"}`` as ``image 640x480 mask_image 640x480``."""
    if not isinstance(value, Mapping) or not value:
        return None
    return " ".join(f"{name} {size}" for name, size in value.items())


def _value(value: object) -> str:
    """A value of the ``Key: value, ...`` line; quoted (JSON) where a comma or colon would split it."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(mark in text for mark in ',:"\n') else text
