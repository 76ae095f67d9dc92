"""The images a request starts from (image-to-image, inpainting, ControlNet): checked, decoded and sized before any
weight moves.

``generate(prompt, image=...)`` is image-to-image (diffusers' ``ZImageImg2ImgPipeline``); with ``mask_image=`` too
it is inpainting (``ZImageInpaintPipeline``: white pixels of the mask are drawn anew, black ones kept).
``control_image=`` conditions the denoising on a ControlNet: alone, ControlNet text-to-image
(``ZImageControlNetPipeline``); with ``image=`` and ``mask_image=``, ControlNet inpainting
(``ZImageControlNetInpaintPipeline``, which runs the whole schedule from noise and so takes no ``strength``).
diffusers has no ControlNet image-to-image pipeline for Z-Image: ``control_image`` with ``image`` but no mask is
refused. Each input may be a PIL image, a numpy array or a path (``~`` is the home folder). Here they become a
:class:`TaskInputs`, or an :class:`~zimage_turbo.errors.InvalidImageError` naming the argument:

* a file must exist, be an image Pillow reads, and stay within Pillow's decompression-bomb limit
  (``PIL.Image.MAX_IMAGE_PIXELS``, which also bounds images given in memory); a file's EXIF orientation is
  applied, as ``diffusers.utils.load_image`` does;
* pixels become RGB (a mask: 8-bit grey) with Pillow's ``convert``, which is what diffusers' image processors
  do when they convert: alpha is dropped, palettes and grey are expanded. 16-bit and float pixels (modes ``I``,
  ``I;16``, ``F``) are refused: Pillow clips them instead of scaling;
* numpy arrays: ``uint8`` (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); floats in [0, 1] (what diffusers takes)
  become 8-bit through diffusers' own ``numpy_to_pil``; a mask may also be ``bool``;
* a mask must have the size of its image.

Without ``height``/``width`` the output has the input's size (``image``'s, else ``control_image``'s), rounded
down to multiples of 16 as diffusers' image processor rounds it; with them (or after a downscale by the
out-of-memory ladder) the input is resized with diffusers' resize (Lanczos) and the result's ``warnings`` say so.
The mask is resized by the pipeline. (diffusers' ControlNet pipelines document the control image's size as their
default but make 1024x1024 without ``height`` and ``width``: give both for the image diffusers makes.)
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ControlNetError, InvalidImageError, InvalidRequestError
from .model import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE

__all__ = [
    "DEFAULT_CONTROL_SCALE",
    "DEFAULT_STRENGTH",
    "ImageInput",
    "InputImage",
    "TaskInputs",
    "TaskName",
    "check_control_scale",
    "check_strength",
    "denoising_steps",
    "read_image",
    "task_inputs",
]

TaskName = Literal["text_to_image", "image_to_image", "inpaint", "control", "control_inpaint"]
#: what ``image=``, ``mask_image=`` and ``control_image=`` take
ImageInput = Image.Image | np.ndarray | str | os.PathLike[str]
#: what ``strength=None`` means: the default of the diffusers pipeline that does the task
DEFAULT_STRENGTH = {"image_to_image": 0.6, "inpaint": 1.0}
#: ``controlnet_conditioning_scale``'s default in diffusers' ControlNet pipelines for Z-Image
DEFAULT_CONTROL_SCALE = 0.75
# EXIF orientations that turn the picture a quarter turn (its width and height swap)
_QUARTER_TURNS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True, eq=False)
class InputImage:
    """One input image: its size, the file it came from (if any) and, once decoded, its pixels in the mode the
    pipeline takes (``"RGB"``, or ``"L"`` for a mask).

    A file checked without decoding (a batch line, read long before its turn) has ``pixels`` None until
    :meth:`loaded`; images given in memory are converted at once.
    """

    argument: str
    size: tuple[int, int]  # (width, height), after the EXIF orientation for files
    path: Path | None = None
    pixels: Image.Image | None = None

    @property
    def mask(self) -> bool:
        return self.argument == "mask_image"

    def loaded(self) -> InputImage:
        """This image with its pixels decoded (itself when they already are)."""
        if self.pixels is not None:
            return self
        assert self.path is not None
        return read_image(self.path, self.argument)

    def given(self) -> Image.Image | Path:
        """What ``generate`` takes to make this image again: the pixels once decoded, else the file."""
        if self.pixels is not None:
            return self.pixels
        assert self.path is not None
        return self.path


@dataclass(frozen=True, eq=False)
class TaskInputs:
    """The input images of one request and how strongly they act (see the module's description).

    ``strength`` is diffusers' ``strength`` in (0, 1]: the share of the denoising schedule that runs from the
    noised input (1: the input's content is drawn anew, apart from what a mask keeps). ControlNet requests run
    the whole schedule (their pipelines take no strength): 1.0 there. ``control`` is the ControlNet's input and
    ``control_scale`` diffusers' ``controlnet_conditioning_scale``, what the ControlNet's hints are multiplied by.
    """

    image: InputImage | None
    mask: InputImage | None = None
    strength: float = DEFAULT_STRENGTH["image_to_image"]
    control: InputImage | None = None
    control_scale: float = DEFAULT_CONTROL_SCALE

    @property
    def task(self) -> TaskName:
        if self.control is not None:
            return "control_inpaint" if self.mask is not None else "control"
        return "inpaint" if self.mask is not None else "image_to_image"

    @property
    def image_encodes(self) -> tuple[int, ...]:
        """The batch of each pass of the VAE encoder in the request's ``encode_image`` phase, for one image: the
        image, and for inpainting the image with the mask's area blanked; ControlNet requests the control image
        (and for ControlNet inpainting the masked image) once per image (see :meth:`encoder_batches`)."""
        return self.encoder_batches(1)

    def encoder_batches(self, images: int) -> tuple[int, ...]:
        """The batch of each pass of the VAE encoder for a request of ``images`` images: diffusers' ControlNet
        pipelines encode their inputs repeated once per image, the others once."""
        passes = 1 + (self.mask is not None)
        return (images,) * passes if self.control is not None else (1,) * passes

    def sizes(self) -> dict[str, tuple[int, int]]:
        """(width, height) of each input, by argument name."""
        return {each.argument: each.size for each in self._given()}

    def loaded(self) -> TaskInputs:
        """These inputs with every image decoded."""
        image, mask, control = (each.loaded() if each is not None else None for each in self._all())
        return TaskInputs(image, mask, self.strength, control, self.control_scale)

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of ``generate`` that give these inputs again."""
        image, mask, control = (each.given() if each is not None else None for each in self._all())
        given: dict[str, Any] = {"image": image, "mask_image": mask}
        if control is None:
            return {**given, "strength": self.strength}
        return {**given, "control_image": control, "control_scale": self.control_scale}

    def output_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) of the output: as given; one side given, the other keeps the input's aspect ratio;
        neither, the input's size rounded down to multiples of 16 (diffusers' rule). The input is ``image``, or
        without one ``control_image``. Checked later with every request; a default outside the allowed sizes is
        refused here, naming the input."""
        source = self.image or self.control
        assert source is not None
        image_width, image_height = source.size
        if height is not None and width is not None:
            return height, width
        if height is not None:
            return height, _multiple(_side(height) * image_width / image_height)
        if width is not None:
            return _multiple(_side(width) * image_height / image_width), width
        rounded = (image_height - image_height % SIDE_MULTIPLE, image_width - image_width % SIDE_MULTIPLE)
        if not all(MIN_SIDE <= side <= MAX_SIDE for side in rounded):
            scale = min(1024 / max(image_width, image_height), 1.0)
            hint = (_multiple(image_width * scale), _multiple(image_height * scale))
            raise InvalidImageError(
                f"{source.argument} is {image_width}x{image_height}; the output takes its size by default, in "
                f"multiples of 16 between {MIN_SIDE} and {MAX_SIDE} pixels. Pass width and height to resize it (for "
                f"instance width={hint[0]}, height={hint[1]} keeps its aspect ratio).",
                argument=source.argument,
            )
        return rounded

    def resized(self, height: int, width: int) -> list[str]:
        """What the result should say about inputs resized to ``width`` x ``height``."""
        return [
            f"{each.argument} was resized from {each.size[0]}x{each.size[1]} to {width}x{height} (Lanczos)"
            for each in self._given()
            if each.size != (width, height)
        ]

    def _all(self) -> tuple[InputImage | None, InputImage | None, InputImage | None]:
        return self.image, self.mask, self.control

    def _given(self) -> list[InputImage]:
        return [each for each in self._all() if each is not None]


def task_inputs(
    image: object = None,
    mask_image: object = None,
    strength: object = None,
    control_image: object = None,
    control_scale: object = DEFAULT_CONTROL_SCALE,
    *,
    decode: bool = True,
) -> TaskInputs | None:
    """The checked inputs of a request, or None for text-to-image (and then ``mask_image`` and ``strength`` must
    not be given). ``decode=False`` checks files by their headers only (their pixels are decoded at their turn).
    ``control_scale`` is checked whether or not ``control_image`` is given (it only acts with one)."""
    scale = check_control_scale(control_scale)
    if control_image is not None:
        return _control_inputs(image, mask_image, strength, control_image, scale, decode)
    if image is None:
        for name, value in (("mask_image", mask_image), ("strength", strength)):
            if value is not None:
                raise InvalidRequestError(
                    f"{name} applies to image-to-image and inpainting: give image= too, or leave out {name}"
                )
        return None
    source = read_image(image, "image", decode=decode)
    mask = _mask_of(source, mask_image, decode)
    task: TaskName = "inpaint" if mask is not None else "image_to_image"
    chosen = DEFAULT_STRENGTH[task] if strength is None else check_strength(strength)
    return TaskInputs(source, mask, chosen)


def _control_inputs(
    image: object, mask_image: object, strength: object, control_image: object, scale: float, decode: bool
) -> TaskInputs:
    """The inputs of a ControlNet request: ``control_image`` alone, or with ``image`` and ``mask_image``."""
    if image is not None and mask_image is None:
        raise ControlNetError(
            "control_image with image= but no mask_image: diffusers has no ControlNet image-to-image pipeline for "
            "Z-Image (ZImageControlNetPipeline takes no image, ZImageControlNetInpaintPipeline needs a mask). Give "
            "mask_image= too for ControlNet inpainting, or leave out image=",
            argument="image",
        )
    if image is None and mask_image is not None:
        raise InvalidRequestError("mask_image applies to inpainting: give image= too, or leave out mask_image")
    if strength is not None:
        raise ControlNetError(
            "strength does not apply to ControlNet requests: diffusers' ZImageControlNetPipeline and "
            "ZImageControlNetInpaintPipeline run the whole schedule from noise. Leave out strength",
            argument="strength",
        )
    control = read_image(control_image, "control_image", decode=decode)
    source = read_image(image, "image", decode=decode) if image is not None else None
    mask = _mask_of(source, mask_image, decode) if source is not None else None
    return TaskInputs(source, mask, 1.0, control, scale)


def _mask_of(source: InputImage, mask_image: object, decode: bool) -> InputImage | None:
    """The checked mask of ``source`` (None without one): the size of its image."""
    if mask_image is None:
        return None
    mask = read_image(mask_image, "mask_image", decode=decode)
    if mask.size != source.size:
        raise InvalidImageError(
            f"mask_image is {mask.size[0]}x{mask.size[1]} but image is {source.size[0]}x{source.size[1]}; "
            "a mask must have the size of its image",
            argument="mask_image",
        )
    return mask


def check_control_scale(value: object) -> float:
    """``value`` as a ControlNet scale: a finite number >= 0 (diffusers' ``controlnet_conditioning_scale``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ControlNetError(
            f"control_scale must be a number >= 0, got {type(value).__name__} {value!r}", argument="control_scale"
        )
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
        raise ControlNetError(
            f"control_scale must be a finite number >= 0 (what the ControlNet's hints are multiplied by), got {number}",
            argument="control_scale",
        )
    return number


def check_strength(value: object) -> float:
    """``value`` as a strength: a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(f"strength must be a number in (0, 1], got {type(value).__name__} {value!r}")
    number = float(value)
    if not (math.isfinite(number) and 0 < number <= 1):
        raise InvalidRequestError(
            f"strength must be in (0, 1] (the share of the denoising schedule run from the noised input), got {number}"
        )
    return number


def denoising_steps(steps: int, strength: float) -> int:
    """The transformer passes diffusers' image-to-image and inpaint pipelines run for ``steps`` at ``strength``:
    they skip the first ``steps - int(steps * strength)`` or so of the schedule (their ``get_timesteps``)."""
    start = int(max(steps - min(steps * strength, steps), 0))
    return steps - start


def read_image(value: object, argument: str, *, decode: bool = True) -> InputImage:
    """``value`` (a PIL image, a numpy array, a path) as an :class:`InputImage` of ``argument``; files are only
    checked by their header when ``decode`` is False."""
    mask = argument == "mask_image"
    if isinstance(value, Image.Image):
        return _from_pixels(value, argument)
    if isinstance(value, np.ndarray):
        return _from_pixels(_array_image(value, argument, mask), argument)
    if isinstance(value, (str, os.PathLike)):
        return _from_file(_path(value, argument), argument, decode)
    raise InvalidImageError(
        f"{argument} must be a PIL image, a numpy array or a path, got {type(value).__name__}", argument=argument
    )


def _from_pixels(image: Image.Image, argument: str, path: Path | None = None) -> InputImage:
    _check_pixel_count(image.size, argument)
    return InputImage(argument, image.size, path, _converted(image, argument))


def _converted(image: Image.Image, argument: str) -> Image.Image:
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        raise InvalidImageError(
            f"{argument} has {mode!r} pixels (16-bit or floating point), which Pillow clips instead of scaling "
            "when converting; convert it to 8-bit RGB (or grey, for a mask) first",
            argument=argument,
        )
    target = "L" if argument == "mask_image" else "RGB"
    if min(image.size) < 1:
        raise InvalidImageError(f"{argument} is empty ({image.size[0]}x{image.size[1]} pixels)", argument=argument)
    return image if mode == target else image.convert(target)


def _array_image(array: np.ndarray, argument: str, mask: bool) -> Image.Image:
    shape = array.shape
    if array.ndim == 3 and shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InvalidImageError(
            f"{argument} as a numpy array must be (height, width), (height, width, 1), (height, width, 3) or "
            f"(height, width, 4), got shape {shape}",
            argument=argument,
        )
    if mask and array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.all((array >= 0) & (array <= 1)):  # NaN fails both comparisons
            raise InvalidImageError(
                f"{argument} as a float array must hold values in [0, 1] (as diffusers takes them)", argument=argument
            )
        from diffusers.image_processor import VaeImageProcessor

        [image] = VaeImageProcessor.numpy_to_pil(array[None] if array.ndim == 3 else array[None, :, :, None])
        return image  # type: ignore[no-any-return]
    if array.dtype != np.uint8:
        raise InvalidImageError(
            f"{argument} as a numpy array must be uint8 (or float in [0, 1]{', or bool' if mask else ''}), "
            f"got {array.dtype}",
            argument=argument,
        )
    _check_pixel_count((array.shape[1], array.shape[0]), argument)
    return Image.fromarray(np.ascontiguousarray(array))


def _path(value: str | os.PathLike[str], argument: str) -> Path:
    from .result import entered_path

    path = entered_path(value, argument)
    if not path.is_file():
        raise InvalidImageError(f"{argument}: there is no file {str(path)!r}", argument=argument)
    return path


def _from_file(path: Path, argument: str, decode: bool) -> InputImage:
    """The image in ``path``: its header read (size, EXIF orientation), and with ``decode`` its pixels."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises only above twice that: both are refused here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                _check_pixel_count(opened.size, argument, path)
                if not decode:
                    return InputImage(argument, _upright_size(opened), path)
                opened.load()
                return _from_pixels(ImageOps.exif_transpose(opened), argument, path)
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(argument, path) from None
    except UnidentifiedImageError:
        raise InvalidImageError(
            f"{argument}: {str(path)!r} is not an image Pillow can read", argument=argument
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # what Pillow raises for damaged files
        raise InvalidImageError(
            f"{argument}: {str(path)!r} could not be decoded ({type(exc).__name__}: {exc})", argument=argument
        ) from None


def _upright_size(opened: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation in the header is applied (``getexif`` could decode a PNG)."""
    width, height = opened.size
    raw = opened.info.get("exif")
    if isinstance(raw, bytes):
        exif = Image.Exif()
        exif.load(raw)
        if exif.get(_EXIF_ORIENTATION) in _QUARTER_TURNS:
            return height, width
    return width, height


def _check_pixel_count(size: tuple[int, int], argument: str, path: Path | None = None) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise _too_many_pixels(argument, path)


def _too_many_pixels(argument: str, path: Path | None) -> InvalidImageError:
    where = f" ({str(path)!r})" if path is not None else ""
    return InvalidImageError(
        f"{argument}{where} has more pixels than Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS = "
        f"{Image.MAX_IMAGE_PIXELS}); a picture that large is refused before it is decoded. Make it smaller first.",
        argument=argument,
    )


def _side(value: object) -> float:
    """A side given with the other left out, as a number to scale by (checked as an int with the request)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(f"height and width must be integers, got {type(value).__name__} {value!r}")
    return float(value)


def _multiple(side: float) -> int:
    """``side`` rounded to the nearest multiple of 16, within the allowed sizes."""
    return int(min(max(round(side / SIDE_MULTIPLE) * SIDE_MULTIPLE, MIN_SIDE), MAX_SIDE))
