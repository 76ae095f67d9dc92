"""What a generation returns: the images and an account of how they were made."""

from __future__ import annotations

import io
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ._version import __version__
from .errors import InvalidRequestError
from .image_metadata import png_info
from .preview import preview_image

if TYPE_CHECKING:
    import torch

__all__ = [
    "Fallback",
    "GenerationResult",
    "StepInfo",
    "Timings",
    "check_output_path",
    "image_grid",
    "output_paths",
    "save_image_atomically",
]

# Most file systems refuse longer names (ext4, XFS, APFS, NTFS: 255 bytes or UTF-16 units).
MAX_FILE_NAME_BYTES = 255


@dataclass(frozen=True)
class StepInfo:
    """What a ``callback`` passed to :meth:`~zimage_turbo.Generator.generate` receives after each denoising step.

    Attributes:
        step: steps finished so far, 1 to ``steps``.
        steps: the steps of this denoising run.
        prompt: the prompt being generated.
        prompt_index: its position in :meth:`~zimage_turbo.Generator.generate_many`'s list (0 for ``generate``).
        strategy: the strategy running it. After an out-of-memory fallback the denoising starts again under
            the next strategy, so ``step`` starts again at 1.
        timestep: the scheduler's timestep of the step just taken (from 1000, pure noise, down towards 0).
        latents: the latents after this step, ``(num_images, 16, height / 8, width / 8)``, float32, on the
            denoiser's device. It is the pipeline's own tensor, lent for the duration of the callback: read it,
            never modify it (the image would change), and ``.clone()`` it to keep it past the callback (what the
            tensor holds afterwards is not promised). :meth:`preview` turns it into a small picture.

    Equality compares the step's position (``step``, ``steps``, ``prompt``, ``prompt_index``, ``strategy``), not
    its timestep or tensors.

    The callback runs in the generating thread, inside ``torch.inference_mode()`` and while the Generator's
    lock is held. Whatever it raises stops the generation at once and reaches the caller unchanged
    (``KeyboardInterrupt`` too); nothing is decoded, and the Generator stays usable.

        >>> def show(info: StepInfo) -> None:
        ...     print(f"{info.step}/{info.steps}")
        ...     info.preview(size=128).save(f"step-{info.step}.png")
    """

    step: int
    steps: int
    prompt: str
    prompt_index: int = 0
    strategy: str = ""
    timestep: float = field(default=0.0, compare=False)
    latents: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def preview(self, *, size: int = 256, index: int = 0) -> Image.Image:
        """A small RGB picture of image ``index`` at this step, from the latents alone (no VAE, a few
        milliseconds, approximate colours): see :func:`~zimage_turbo.preview.preview_image`."""
        if self.latents is None:
            raise InvalidRequestError("this StepInfo carries no latents to preview")
        return preview_image(self.latents, size=size, index=index)


@dataclass(frozen=True)
class Timings:
    """Seconds spent in each phase of one call.

    ``load`` is non-zero only for the call that loaded the model; ``recovery`` is time spent on attempts that
    ran out of memory and on moving weights between strategies. ``encode_image`` is the VAE encoder's pass over
    the input images of image-to-image and inpainting (0 for text-to-image). ``prepare`` is what the call did
    before its first phase: choosing the attention kernel for a new shape (timed once per GPU model and shape)
    and setting up compilation where it starts to pay (the compiling itself happens in the phase that first runs
    the compiled part).
    """

    load: float = 0.0
    encode: float = 0.0
    denoise: float = 0.0
    decode: float = 0.0
    recovery: float = 0.0
    encode_image: float = 0.0
    prepare: float = 0.0

    @property
    def work(self) -> float:
        """The phases of the attempt that succeeded."""
        return self.encode + self.encode_image + self.denoise + self.decode

    @property
    def total(self) -> float:
        return self.load + self.prepare + self.work + self.recovery

    def to_dict(self) -> dict[str, float]:
        """Every phase's seconds and the total, as manifests and ``--json`` record them."""
        return {
            "load": self.load,
            "prepare": self.prepare,
            "encode": self.encode,
            "encode_image": self.encode_image,
            "denoise": self.denoise,
            "decode": self.decode,
            "recovery": self.recovery,
            "total": self.total,
        }


@dataclass(frozen=True)
class Fallback:
    """One change of plan: what was running, what replaced it, in which phase, and why.

    ``kind`` is ``"strategy"`` (a placement ran out of memory and the next one took over), ``"error"`` (a
    placement failed on its first use for another reason, given with the exception's type and text; this
    Generator does not use it again and the next one took over), ``"vae_tiling"`` (a decode ran out of memory
    and was retried in tiles), ``"downscale"`` (a smaller image was made) or ``"load"`` (loading onto the GPU ran
    out of memory; the weights went to host memory).
    """

    kind: str
    before: str
    after: str
    phase: str
    reason: str

    def __str__(self) -> str:
        change = f"{self.before} -> {self.after}" if self.after else f"{self.before} failed"
        return f"{self.kind}: {change} ({self.phase}: {self.reason})"


@dataclass(frozen=True, eq=False)
class GenerationResult:
    """Images of one ``generate`` call and how they were made.

    In Jupyter the result shows its image (several: a grid of them, :func:`image_grid`).
    ``result.save("out.png")`` writes it.

    Attributes:
        images: the generated images, in seed order.
        seeds: the seed of each image (image ``k`` used ``seeds[k]``); pass ``seed=seeds[0]`` to repeat. None
            for an image whose noise came from a ``torch.Generator`` passed as ``generator=``: no int
            reproduces it (``warnings`` says so too).
        strategy: the load strategy that produced the images (e.g. ``"full_gpu"``).
        device: where the denoiser ran (e.g. ``"cuda:0"``).
        timings: seconds per phase.
        peak_memory: peak bytes per device: ``"cuda:N"`` is the peak allocated by torch during the attempt
            that succeeded; ``"host"`` is the peak resident memory of the whole process so far.
        predicted_peak_memory: what the planner predicted for that attempt, per GPU.
        vae_tiling: whether the VAE decoded in tiles.
        attention: the attention kernel the transformer used (see ``settings.attention``).
        compiled: the parts that ran compiled (``torch.compile``): ``"blocks"`` (the transformer's repeated
            blocks), ``"text_encoder"``, ``"vae_decoder"``, ``"fp8_linears"`` (the fp8 layers of streamed
            blocks); empty when none did (a tuple, so ``if result.compiled:`` reads naturally).
        quantization: ``"fp8"`` or ``"int8"`` when the transformer's linear layers were quantized, else None.
        fallbacks: each change of plan taken to get here, with its reason (empty when none).
        warnings: things the caller should know (a prompt cut at the token limit, an ignored option).
        negative_prompt: the negative prompt given (it has an effect only when ``guidance_scale > 0``).
        model: the model's repo id, or the name of its folder when it was a local folder (never the whole
            path: the name is stored in saved images, which get shared); None where unknown.
        model_revision: the model's revision (a Hugging Face snapshot's commit, or the revision asked for)
            where known, else None.
        loras: the LoRAs fused into the weights that made the images, name -> scale, in loading order (see
            :meth:`~zimage_turbo.Generator.load_lora`); empty without.
        task: ``"text_to_image"``, ``"image_to_image"``, ``"inpaint"``, ``"control"`` (ControlNet text-to-image) or
            ``"control_inpaint"`` (ControlNet inpainting).
        strength: the ``strength`` of image-to-image and inpainting (None for the other tasks).
        input_sizes: (width, height) of each input image as given, by argument (``"image"``, ``"mask_image"``,
            ``"control_image"``); empty for text-to-image. ``warnings`` say when they were resized to the output's
            size.
        control_scale: the ControlNet's ``control_scale`` (None without a ControlNet).
        controlnet: the ControlNet that made the images: its repo id, or its folder's or file's name (None
            without one).
    """

    images: tuple[Image.Image, ...]
    prompt: str
    seeds: tuple[int | None, ...]
    width: int
    height: int
    steps: int
    guidance_scale: float
    strategy: str
    device: str
    dtype: str
    timings: Timings
    peak_memory: Mapping[str, int] = field(default_factory=dict)
    predicted_peak_memory: Mapping[str, int] = field(default_factory=dict)
    vae_tiling: bool = False
    attention: str = "native"
    compiled: tuple[str, ...] = ()
    quantization: str | None = None
    fallbacks: tuple[Fallback, ...] = ()
    warnings: tuple[str, ...] = ()
    negative_prompt: str | None = None
    model: str | None = None
    model_revision: str | None = None
    loras: Mapping[str, float] = field(default_factory=dict)
    task: str = "text_to_image"
    strength: float | None = None
    input_sizes: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    control_scale: float | None = None
    controlnet: str | None = None

    @property
    def image(self) -> Image.Image:
        """The first image."""
        return self.images[0]

    @property
    def seed(self) -> int | None:
        """The seed of the first image (None when its noise came from a ``torch.Generator``)."""
        return self.seeds[0]

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> list[Path]:
        """Write the images; returns the paths written.

        One image goes to ``path`` (``~`` is the home folder). Several go to ``<stem>-<k><suffix>``
        (``out-0.png``, ``out-1.png``...). An existing file is refused (:class:`InvalidRequestError`, before
        anything is written) unless ``overwrite=True``. Each file is written to a temporary name and renamed,
        so a crash never leaves a partial image.

        A PNG carries how it was made (:meth:`metadata`, read back with :func:`zimage_turbo.read_metadata`);
        other formats are written without it.
        """
        targets = output_paths(path, len(self.images))
        for each in targets:
            check_output_path(each, overwrite=overwrite)
        for index, (image, each) in enumerate(zip(self.images, targets, strict=True)):
            save_image_atomically(image, each, self.metadata(index))
        return targets

    def metadata(self, index: int = 0) -> dict[str, Any]:
        """How image ``index`` was made, as saved into its PNG (JSON-ready; see
        :mod:`zimage_turbo.image_metadata`). Image-to-image and inpainting add ``task``, ``strength`` and
        ``input_sizes`` (``{"image": "WxH", ...}``); ControlNet requests ``task``, ``input_sizes``,
        ``control_scale`` and ``controlnet``."""
        task: dict[str, Any] = {}
        if self.task != "text_to_image":
            sizes = {name: f"{width}x{height}" for name, (width, height) in self.input_sizes.items()}
            task = {"task": self.task, "strength": self.strength, "input_sizes": sizes}
        if self.control_scale is not None:
            task = {**task, "control_scale": self.control_scale, "controlnet": self.controlnet}
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seeds[index],
            "steps": self.steps,
            "width": self.width,
            "height": self.height,
            "guidance_scale": self.guidance_scale,
            "strategy": self.strategy,
            "quantization": self.quantization,
            "dtype": self.dtype,
            "model": self.model,
            "model_revision": self.model_revision,
            "loras": dict(self.loras),
            "version": __version__,
            **task,
        }

    def _repr_png_(self) -> bytes:
        """What Jupyter shows: the image, or a grid of all of them (:func:`image_grid`)."""
        buffer = io.BytesIO()
        shown = self.image if len(self.images) == 1 else image_grid(self.images)
        shown.save(buffer, format="PNG")
        return buffer.getvalue()

    def __repr__(self) -> str:
        return (
            f"GenerationResult({len(self.images)} image(s) {self.width}x{self.height}, seed={self.seeds[0]}, "
            f"steps={self.steps}, strategy={self.strategy!r}, device={self.device!r}, "
            f"{self.timings.total:.2f} s{f', {len(self.fallbacks)} fallback(s)' if self.fallbacks else ''})"
        )


# Grid of several images: pixels between the tiles, and the longest side the whole grid may have.
GRID_GAP = 8
GRID_MAX_SIDE = 2048


def image_grid(images: Sequence[Image.Image], *, gap: int = GRID_GAP, max_side: int = GRID_MAX_SIDE) -> Image.Image:
    """The images side by side in rows, for showing several at once (how a result with several displays).

    ``ceil(sqrt(n))`` columns, as many rows as needed, left to right then top to bottom, ``gap`` white pixels
    between tiles; each tile is the size of the largest image, the others are centred in theirs. The tiles are
    shrunk (keeping their aspect ratio) so that the grid is at most ``max_side`` pixels on each side.
    """
    if not images:
        raise InvalidRequestError("image_grid needs at least one image")
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    tile_w = max(image.width for image in images)
    tile_h = max(image.height for image in images)
    # the gaps keep their size: only the tiles shrink
    scale = min(
        1.0, (max_side - (columns - 1) * gap) / (columns * tile_w), (max_side - (rows - 1) * gap) / (rows * tile_h)
    )
    tile_w, tile_h = max(1, int(tile_w * scale)), max(1, int(tile_h * scale))
    grid = Image.new("RGB", (columns * tile_w + (columns - 1) * gap, rows * tile_h + (rows - 1) * gap), "white")
    for k, image in enumerate(images):
        tile = image.convert("RGB")
        if scale < 1:
            shrunk = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
            tile = tile.resize(shrunk, Image.Resampling.LANCZOS)
        row, column = divmod(k, columns)
        x = column * (tile_w + gap) + (tile_w - tile.width) // 2
        y = row * (tile_h + gap) + (tile_h - tile.height) // 2
        grid.paste(tile, (x, y))
    return grid


def output_paths(path: str | os.PathLike[str], count: int) -> list[Path]:
    """Where ``count`` images for ``path`` go: ``path`` itself for one, ``<stem>-<k><suffix>`` for several."""
    target = entered_path(path)
    if count == 1:
        return [target]
    return [target.with_name(f"{target.stem}-{k}{target.suffix}") for k in range(count)]


def entered_path(path: object, what: str = "output path") -> Path:
    """A path as the caller gave it, checked and with ``~`` expanded: done once, where a path enters, so that
    the check and the write see the same file."""
    try:
        text = os.fspath(path)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidRequestError(f"{what} must be a str or os.PathLike, got {type(path).__name__}") from None
    if not isinstance(text, str):
        raise InvalidRequestError(f"{what} must be text, got {type(text).__name__}")
    if "\x00" in text:
        raise InvalidRequestError(f"{what} contains a NUL character")
    return Path(text).expanduser()


def check_output_path(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Refuse an output path that cannot be written, before any expensive work happens."""
    target = entered_path(path)
    if len(os.fsencode(target.name)) > MAX_FILE_NAME_BYTES:
        raise InvalidRequestError(
            f"output file name is {len(os.fsencode(target.name))} bytes long; file systems allow {MAX_FILE_NAME_BYTES}"
        )
    if not target.suffix:
        raise InvalidRequestError(f"output path {str(target)!r} has no file extension (.png, .jpg, .webp...)")
    if target.suffix.lower() not in Image.registered_extensions():
        raise InvalidRequestError(f"output path {str(target)!r}: Pillow cannot write {target.suffix!r} files")
    folder = target.parent
    if not folder.is_dir():
        raise InvalidRequestError(f"output folder {str(folder)!r} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise InvalidRequestError(f"output folder {str(folder)!r} is not writable")
    if target.is_dir():
        raise InvalidRequestError(f"output path {str(target)!r} is a folder; give a file name")
    if target.exists() and not overwrite:
        raise InvalidRequestError(f"{str(target)!r} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    return target


def save_image_atomically(image: Image.Image, path: Path, metadata: Mapping[str, Any] | None = None) -> None:
    """Save to a temporary file beside ``path``, then rename: readers never see half a file.

    ``metadata`` (see :meth:`GenerationResult.metadata`) goes into a PNG's text chunks; other formats are
    written without it. The temporary file is created like any new file (so the umask applies, unlike
    ``mkstemp``'s 0600).
    """
    image_format = Image.registered_extensions()[path.suffix.lower()]
    options: dict[str, Any] = {}
    if metadata is not None and image_format == "PNG":
        options["pnginfo"] = png_info(metadata)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        with open(temporary, "xb") as stream:
            image.save(stream, format=image_format, **options)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
