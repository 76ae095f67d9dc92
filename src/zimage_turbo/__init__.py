"""zimage-turbo: run Z-Image-Turbo text-to-image on whatever hardware you have.

>>> from zimage_turbo import Generator
>>> result = Generator().generate("a red fox in the snow", seed=7)  # doctest: +SKIP
>>> result.save("fox.png")                                         # doctest: +SKIP
"""

from ._version import __version__
from .checkpoints import make_checkpoint
from .errors import (
    CheckpointError,
    DownloadError,
    GeneratorClosedError,
    IncompleteModelError,
    InvalidRequestError,
    InvalidSettingsError,
    ModelLoadError,
    ModelNotFoundError,
    ModelSourceError,
    NumericalError,
    StrategyUnavailableError,
    UnknownStrategyError,
    ZImageError,
)
from .generator import Generator
from .hardware import GPUInfo, Hardware, detect_hardware
from .layout import PipelineLayout, check_pipeline_dir
from .request import GenerationRequest
from .result import GenerationResult, Timings
from .settings import ZImageSettings
from .sources import ResolvedModel, resolve_model
from .strategies import CPUOnly, FullGPU, LoadStrategy

__all__ = [
    "CPUOnly",
    "CheckpointError",
    "DownloadError",
    "FullGPU",
    "GPUInfo",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "GeneratorClosedError",
    "Hardware",
    "IncompleteModelError",
    "InvalidRequestError",
    "InvalidSettingsError",
    "LoadStrategy",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelSourceError",
    "NumericalError",
    "PipelineLayout",
    "ResolvedModel",
    "StrategyUnavailableError",
    "Timings",
    "UnknownStrategyError",
    "ZImageError",
    "ZImageSettings",
    "__version__",
    "check_pipeline_dir",
    "detect_hardware",
    "make_checkpoint",
    "resolve_model",
]
