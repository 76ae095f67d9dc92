"""zimage-turbo: run Z-Image-Turbo (text-to-image, image-to-image, inpainting) on whatever hardware you have.

>>> from zimage_turbo import Generator
>>> result = Generator().generate("a red fox in the snow", seed=7)  # doctest: +SKIP
>>> result.save("fox.png")                                         # doctest: +SKIP
"""

from ._version import __version__
from .checkpoints import make_checkpoint
from .errors import (
    BatchConflictError,
    BatchLockedError,
    CheckpointError,
    ControlNetError,
    ControlNetNotFoundError,
    DeviceFailedError,
    DownloadError,
    GenerationInterruptedError,
    GeneratorClosedError,
    IncompleteModelError,
    InvalidImageError,
    InvalidRequestError,
    InvalidSettingsError,
    LoraError,
    LoraNotFoundError,
    ModelLoadError,
    ModelNotFoundError,
    ModelScopeNotInstalledError,
    ModelSourceError,
    NotEnoughDiskSpaceError,
    NotEnoughMemoryError,
    NumericalError,
    PlacementFailedError,
    StrategyUnavailableError,
    UnknownStrategyError,
    ZImageError,
)
from .generator import Generator
from .hardware import DeviceSpeeds, GPUInfo, Hardware, detect_hardware
from .image_metadata import read_metadata
from .layout import PipelineLayout, check_pipeline_dir
from .planner import Candidate, Plan, plan
from .pool import GeneratorPool, PromptFailure
from .preview import preview_image
from .profile import ComponentProfile, ModelProfile, Workload
from .request import GenerationRequest
from .result import Fallback, GenerationResult, StepInfo, Timings
from .settings import ZImageSettings
from .sources import ResolvedModel, resolve_model
from .strategies import (
    CPUOnly,
    FullGPU,
    Hybrid,
    LoadStrategy,
    MemoryEstimate,
    ModelCPUOffload,
    MultiGPUDispatch,
    MultiGPUHybrid,
    PartialOffload,
    SequentialOffload,
    StreamedOffload,
)
from .task_inputs import TaskInputs

__all__ = [
    "BatchConflictError",
    "BatchLockedError",
    "CPUOnly",
    "Candidate",
    "CheckpointError",
    "ComponentProfile",
    "ControlNetError",
    "ControlNetNotFoundError",
    "DeviceFailedError",
    "DeviceSpeeds",
    "DownloadError",
    "Fallback",
    "FullGPU",
    "GPUInfo",
    "GenerationInterruptedError",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "GeneratorClosedError",
    "GeneratorPool",
    "Hardware",
    "Hybrid",
    "IncompleteModelError",
    "InvalidImageError",
    "InvalidRequestError",
    "InvalidSettingsError",
    "LoadStrategy",
    "LoraError",
    "LoraNotFoundError",
    "MemoryEstimate",
    "ModelCPUOffload",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelProfile",
    "ModelScopeNotInstalledError",
    "ModelSourceError",
    "MultiGPUDispatch",
    "MultiGPUHybrid",
    "NotEnoughDiskSpaceError",
    "NotEnoughMemoryError",
    "NumericalError",
    "PartialOffload",
    "PipelineLayout",
    "PlacementFailedError",
    "Plan",
    "PromptFailure",
    "ResolvedModel",
    "SequentialOffload",
    "StepInfo",
    "StrategyUnavailableError",
    "StreamedOffload",
    "TaskInputs",
    "Timings",
    "UnknownStrategyError",
    "Workload",
    "ZImageError",
    "ZImageSettings",
    "__version__",
    "check_pipeline_dir",
    "detect_hardware",
    "make_checkpoint",
    "plan",
    "preview_image",
    "read_metadata",
    "resolve_model",
]
