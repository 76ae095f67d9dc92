"""The errors zimage-turbo raises.

Every error the library raises on purpose derives from :class:`ZImageError`, so an app can catch one class.
Errors about bad input also derive from :class:`ValueError`, and "model not found" from
:class:`FileNotFoundError`, so code written against the built-in exceptions keeps working.

    ZImageError
    ├── InvalidRequestError (ValueError)      a generate() argument is out of range or of the wrong type
    │   ├── BatchConflictError                a batch would replace images made with other parameters
    │   ├── InvalidImageError                 an input image (image=, mask_image=, control_image=) cannot be used
    │   └── ControlNetError                   a ControlNet request or the ControlNet itself cannot be used
    │       └── ControlNetNotFoundError (FileNotFoundError)  no such ControlNet file, folder or cached repo
    ├── InvalidSettingsError (ValueError)     a setting (argument, ZIMAGE_* variable, .env line) is invalid
    ├── UnknownStrategyError (ValueError)     a strategy name or object that we do not know
    ├── StrategyUnavailableError              the strategy cannot run on this machine (no GPU, say)
    ├── CheckpointError                       make_checkpoint() could not build what was asked
    ├── BatchLockedError                      another batch run is using the output folder
    ├── ModelSourceError                      the model could not be found or fetched
    │   ├── ModelNotFoundError (FileNotFoundError)
    │   ├── IncompleteModelError              the folder is not a complete Z-Image pipeline
    │   ├── DownloadError                     every hub we tried failed
    │   │   └── NotEnoughDiskSpaceError       the download would not fit on the disk
    │   └── ModelScopeNotInstalledError (ImportError)  source="modelscope" without zimage-turbo[modelscope]
    ├── ModelLoadError                        the files are there, but loading them failed
    ├── LoraError (ValueError)                a LoRA file is unusable or does not fit the model; nothing changed
    │   └── LoraNotFoundError (FileNotFoundError)  no such LoRA file, folder or cached repo
    ├── NotEnoughMemoryError                  every way of running the request ran out of memory
    ├── NumericalError                        the denoiser produced NaN/inf (a black image otherwise)
    ├── GenerationInterruptedError            the denoising loop was interrupted; nothing was decoded
    ├── DeviceFailedError (RuntimeError)      a CUDA error other than out-of-memory broke the GPU context
    └── GeneratorClosedError                  the Generator was closed
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BatchConflictError",
    "BatchLockedError",
    "CheckpointError",
    "ControlNetError",
    "ControlNetNotFoundError",
    "DeviceFailedError",
    "DownloadError",
    "GenerationInterruptedError",
    "GeneratorClosedError",
    "IncompleteModelError",
    "InvalidImageError",
    "InvalidRequestError",
    "InvalidSettingsError",
    "LoraError",
    "LoraNotFoundError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelScopeNotInstalledError",
    "ModelSourceError",
    "NotEnoughDiskSpaceError",
    "NotEnoughMemoryError",
    "NumericalError",
    "PlacementFailedError",
    "StrategyUnavailableError",
    "UnknownStrategyError",
    "ZImageError",
]


class ZImageError(Exception):
    """Base class of every error zimage-turbo raises on purpose."""


class InvalidRequestError(ZImageError, ValueError):
    """A generation argument is invalid; raised before any weights are loaded or GPU memory is touched."""


class BatchConflictError(InvalidRequestError):
    """A batch's output folder holds images of some of its ids made with other parameters (prompt, seed, size,
    steps) than the input now gives them; nothing was replaced. ``ids`` lists them (in input order),
    ``folder`` is the output folder. Pass ``overwrite=True`` (``--overwrite``) to make them again, or use
    another folder, as ``generate`` refuses to replace a file without ``--overwrite``."""

    def __init__(self, message: str, *, folder: str, ids: Sequence[str]) -> None:
        super().__init__(message)
        self.folder = folder
        self.ids: tuple[str, ...] = tuple(ids)


class InvalidImageError(InvalidRequestError):
    """An input image of an image-to-image or inpainting request cannot be used: no such file, not decodable,
    beyond Pillow's decompression-bomb limit, pixels of a kind we do not convert, a mask of another size than its
    image. ``argument`` names the argument it came from (``"image"``, ``"mask_image"``). Raised before any weights
    are loaded or moved."""

    def __init__(self, message: str, *, argument: str) -> None:
        super().__init__(message)
        self.argument = argument


class ControlNetError(InvalidRequestError):
    """A ControlNet request cannot run, or the ControlNet cannot be used: ``control_image`` without a ControlNet
    configured (the ``controlnet`` setting), a ``control_scale`` that is not a finite number >= 0, inputs that
    no diffusers pipeline takes together, a ControlNet whose config or weights do not fit the model's transformer
    (another architecture). ``argument`` names the argument or setting at fault (``"control_image"``,
    ``"control_scale"``, ``"controlnet"``...). Raised before any weight moves: the Generator still makes the
    images it made before."""

    def __init__(self, message: str, *, argument: str) -> None:
        super().__init__(message)
        self.argument = argument


class ControlNetNotFoundError(ControlNetError, FileNotFoundError):
    """The ``controlnet`` setting names no file, no folder holding one, and no repo in a cache we may use
    (offline) or download."""

    def __init__(self, message: str) -> None:
        super().__init__(message, argument="controlnet")


class InvalidSettingsError(ZImageError, ValueError):
    """A setting is invalid. The message names the field and its ``ZIMAGE_*`` variable."""


class UnknownStrategyError(ZImageError, ValueError):
    """A strategy name (or object) that zimage-turbo does not know."""


class StrategyUnavailableError(ZImageError):
    """The requested strategy cannot run on this machine."""


class CheckpointError(ZImageError):
    """``make_checkpoint`` could not build the requested checkpoint."""


class BatchLockedError(ZImageError):
    """Another batch run holds the output folder's lock (``.zimage-batch.lock``); nothing was done.

    ``folder`` is the output folder; ``pid`` and ``host`` name the holder, as it recorded itself (None when it
    had not yet, or could not). Wait for it (``wait=True``, ``--wait``) or use another folder.
    """

    def __init__(self, message: str, *, folder: str, pid: int | None = None, host: str | None = None) -> None:
        super().__init__(message)
        self.folder = folder
        self.pid = pid
        self.host = host


class ModelSourceError(ZImageError):
    """The model could not be resolved to a complete local folder."""


class ModelScopeNotInstalledError(ModelSourceError, ImportError):
    """The ModelScope source was asked for, but its client is not installed. ``extra`` names the extra that
    installs it: ``pip install 'zimage-turbo[modelscope]'``."""

    extra = "modelscope"


class ModelNotFoundError(ModelSourceError, FileNotFoundError):
    """The model is neither a local folder nor in any cache we searched, and we may not download it.

    ``searched`` lists the places that were looked at.
    """

    def __init__(self, message: str, searched: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.searched: tuple[str, ...] = tuple(searched)


class IncompleteModelError(ModelSourceError):
    """The folder exists but is not a complete Z-Image pipeline.

    ``missing`` lists every file (relative to the folder) that is absent or unusable.
    """

    def __init__(self, message: str, missing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing: tuple[str, ...] = tuple(missing)


class DownloadError(ModelSourceError):
    """No hub could provide the model; the message lists each attempt and why it failed."""


class NotEnoughDiskSpaceError(DownloadError):
    """The files still to download would not fit in the free space of the cache's disk; nothing was fetched.

    ``needed_bytes`` is what is still to fetch (files already in the cache are not counted), ``free_bytes``
    what the disk has free, ``folder`` the cache folder that was checked.
    """

    def __init__(self, message: str, *, needed_bytes: int, free_bytes: int, folder: str) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
        self.folder = folder


class ModelLoadError(ZImageError):
    """The model folder is complete, but diffusers/transformers failed to load it."""


class LoraError(ZImageError, ValueError):
    """A LoRA could not be used: its file (not safetensors, damaged, non-finite values), its format, or its fit
    to the model (keys that match no layer, another architecture, shapes). Raised before any weight changes:
    the Generator still makes the images it made before. ``path`` names the file or source."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class LoraNotFoundError(LoraError, FileNotFoundError):
    """The LoRA is not a file, a folder holding one, or a repo in a cache we may use (offline) or download."""


class NotEnoughMemoryError(ZImageError):
    """Every rung of the out-of-memory ladder failed (or was predicted to).

    ``tried`` lists each attempt and why it failed; ``would_fit`` says what would work (a smaller size,
    ``allow_downscale=True``, more memory), when something would.
    """

    def __init__(self, message: str, tried: Sequence[object] = (), would_fit: str | None = None) -> None:
        super().__init__(message)
        self.tried: tuple[object, ...] = tuple(tried)
        self.would_fit = would_fit


class PlacementFailedError(ZImageError):
    """No rung made the image, and at least one failed for a reason other than memory: a placement that fails
    on its first use (a tensor on the wrong GPU, a kernel that cannot run on that card) is set aside and the
    next rung runs instead; this error comes only when every rung failed.

    ``tried`` lists each attempt (:class:`~zimage_turbo.result.Fallback`) with the exception's text.
    """

    def __init__(self, message: str, tried: Sequence[object] = ()) -> None:
        super().__init__(message)
        self.tried: tuple[object, ...] = tuple(tried)


class NumericalError(ZImageError):
    """The denoised latents contain NaN or infinity; the image would have been black or noise."""


class GenerationInterruptedError(ZImageError):
    """The denoising loop stopped before its last step (diffusers' ``pipeline._interrupt`` was set).

    diffusers would decode the half-denoised latents into a noisy image; we decode nothing and raise this.
    The Generator stays usable.
    """


class DeviceFailedError(ZImageError, RuntimeError):
    """A CUDA error other than running out of memory (an illegal memory access, a device-side assert)
    happened in this Generator.

    Such errors leave the process's CUDA context unusable until the process exits, so retrying or moving
    weights would only raise more of them. The call that hit the error re-raised it unchanged; every later
    call on the Generator raises this error instead. Restart the process.
    """


class GeneratorClosedError(ZImageError):
    """The Generator was closed; create a new one."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for summaries."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
