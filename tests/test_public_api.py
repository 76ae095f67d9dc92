"""The public names are a promise to people who pin this package: changing them is a changelogged act."""

from __future__ import annotations

from pathlib import Path

import zimage_turbo

REVIEWED = {
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
    # 0.2.0: strategies, planning, the out-of-memory ladder
    "Candidate",
    "ComponentProfile",
    "Fallback",
    "Hybrid",
    "MemoryEstimate",
    "ModelCPUOffload",
    "ModelProfile",
    "MultiGPUDispatch",
    "NotEnoughMemoryError",
    "Plan",
    "SequentialOffload",
    "StreamedOffload",
    "Workload",
    "plan",
    # unreleased: reliability (step callbacks, faults, disk space before downloads)
    "DeviceFailedError",
    "GenerationInterruptedError",
    "NotEnoughDiskSpaceError",
    "StepInfo",
    # several GPUs: one replica per device
    "GeneratorPool",
    "PromptFailure",
    # unreleased: two to four GPUs on real cards (a split with the text encoder streamed; failed placements)
    "MultiGPUHybrid",
    "PlacementFailedError",
    # unreleased: a batch's output folder is not replaced, shared or trusted blindly
    "BatchConflictError",
    "BatchLockedError",
    # unreleased: diffusers' argument names; step previews drawn from the latents without the VAE
    "preview_image",
    # unreleased: how an image was made, stored in its PNG
    "read_metadata",
    # unreleased: ModelScope is an extra
    "ModelScopeNotInstalledError",
    # unreleased: partial residency on mid-size cards, planned with the GPU's own measured speeds
    "DeviceSpeeds",
    "PartialOffload",
    # unreleased: image-to-image and inpainting
    "InvalidImageError",
    "TaskInputs",
    # unreleased: LoRA
    "LoraError",
    "LoraNotFoundError",
    # unreleased: ControlNet
    "ControlNetError",
    "ControlNetNotFoundError",
}


def test_exports_are_the_reviewed_list() -> None:
    assert set(zimage_turbo.__all__) == REVIEWED
    for name in zimage_turbo.__all__:
        assert hasattr(zimage_turbo, name), name


def test_ships_type_information() -> None:
    assert (Path(zimage_turbo.__file__).parent / "py.typed").is_file()


def test_every_error_derives_from_the_base() -> None:
    errors = [getattr(zimage_turbo, n) for n in zimage_turbo.__all__ if n.endswith("Error")]
    assert all(issubclass(e, zimage_turbo.ZImageError) for e in errors)


def test_strategy_names_agree_with_settings() -> None:
    from zimage_turbo.settings import STRATEGY_NAMES
    from zimage_turbo.strategies import STRATEGIES

    assert set(STRATEGIES) | {"auto"} == set(STRATEGY_NAMES)
    assert all(cls.name == name for name, cls in STRATEGIES.items())
