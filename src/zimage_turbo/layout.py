"""Is a folder a complete Z-Image pipeline? Checked before loading, so that a missing file is named
up front instead of surfacing as a confusing error halfway through a 20 GB load.

The expected layout is the one diffusers writes and the hubs serve::

    model_index.json
    scheduler/scheduler_config.json
    tokenizer/tokenizer_config.json + tokenizer.json (or vocab.json + merges.txt)
    text_encoder/config.json + model.safetensors (or model.safetensors.index.json + its shards)
    transformer/config.json + diffusion_pytorch_model.safetensors (or an index + shards)
    vae/config.json + diffusion_pytorch_model.safetensors

Weights are the files of these names, as diffusers and transformers choose them (other safetensors files in a
component folder, such as an fp16 variant or a LoRA, are not loaded: see :mod:`~zimage_turbo.weight_files`).

The configs must have the types their readers expect and describe Z-Image (see
:mod:`~zimage_turbo.folder_configs`): the classes and libraries ``model_index.json`` names come from a fixed
list (nothing is ever imported from the folder itself), the transformer config has the Z-Image keys, and the
sizes that have to agree between components (caption features and text encoder width, latent channels) do,
as do the RoPE tables with the largest request we accept. A mismatch found here is named with its file;
found while loading, it would be a shape error in the middle of a 20 GB load, or on a GPU a device-side
assert that ends the process's use of CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import IncompleteModelError
from .folder_configs import CONFIG_CLASSES, CONFIG_FILES, check_configs
from .folder_files import Problems, file_problem, read_json
from .weight_files import choose_weight_files

__all__ = ["PIPELINE_CLASS", "WEIGHTED_COMPONENTS", "PipelineLayout", "check_pipeline_dir"]

PIPELINE_CLASS = "ZImagePipeline"
# component -> the class names diffusers/transformers may record for it in model_index.json
EXPECTED_CLASSES: dict[str, tuple[str, ...]] = {
    "transformer": (CONFIG_CLASSES["transformer"],),
    "text_encoder": ("Qwen3Model", "Qwen3ForCausalLM"),
    "vae": (CONFIG_CLASSES["vae"],),
    "tokenizer": ("Qwen2Tokenizer", "Qwen2TokenizerFast", "PreTrainedTokenizerFast", "TokenizersBackend"),
    "scheduler": (CONFIG_CLASSES["scheduler"],),
}
# component -> the library model_index.json must name for it
EXPECTED_LIBRARIES = {
    "transformer": "diffusers",
    "vae": "diffusers",
    "scheduler": "diffusers",
    "text_encoder": "transformers",
    "tokenizer": "transformers",
}
WEIGHTED_COMPONENTS = ("transformer", "text_encoder", "vae")


@dataclass(frozen=True)
class PipelineLayout:
    """The files of a complete pipeline folder."""

    root: Path
    # component -> its safetensors files, relative to root, in shard order
    weight_files: dict[str, tuple[str, ...]]
    # component -> the class model_index.json names for it (one of EXPECTED_CLASSES)
    classes: dict[str, str]

    def weight_paths(self, component: str) -> tuple[Path, ...]:
        return tuple(self.root / name for name in self.weight_files[component])


def check_pipeline_dir(path: str | Path) -> PipelineLayout:
    """Check that ``path`` holds a complete Z-Image pipeline; return its weight files.

    Raises :class:`~zimage_turbo.errors.IncompleteModelError` listing every missing or unusable file.
    """
    root = Path(path)
    problems: Problems = []
    index_file = root / "model_index.json"
    index = read_json(index_file, problems, "model_index.json")
    if index is None:
        _raise(root, problems)
    assert index is not None

    class_name = index.get("_class_name")
    if class_name != PIPELINE_CLASS:
        problems.append(("model_index.json", f"_class_name is {class_name!r}, expected {PIPELINE_CLASS!r}"))

    weight_files: dict[str, tuple[str, ...]] = {}
    classes: dict[str, str] = {}
    for component, expected in EXPECTED_CLASSES.items():
        entry = index.get(component)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] is not None):
            problems.append(("model_index.json", f"no {component!r} component"))
            continue
        classes[component] = str(entry[1])
        if entry[0] != EXPECTED_LIBRARIES[component]:
            problems.append(
                (
                    "model_index.json",
                    f"{component} comes from library {entry[0]!r}, expected {EXPECTED_LIBRARIES[component]!r} "
                    "(zimage-turbo never imports code named by a model folder)",
                )
            )
        if entry[1] not in expected:
            problems.append(
                (
                    "model_index.json",
                    f"{component} class is {entry[1]!r}, expected one of {', '.join(expected)}",
                )
            )
        folder = root / component
        config_name = f"{component}/{CONFIG_FILES[component]}"
        problem = file_problem(root / config_name)
        if problem is not None:
            problems.append((config_name, problem))
        if component == "tokenizer":
            _check_tokenizer_files(folder, problems)
        elif component in WEIGHTED_COMPONENTS:
            weight_files[component] = choose_weight_files(root, component, problems)
    check_configs(root, problems)

    if problems:
        _raise(root, problems)
    return PipelineLayout(root=root, weight_files=weight_files, classes=classes)


def _check_tokenizer_files(folder: Path, problems: Problems) -> None:
    problem = file_problem(folder / "tokenizer.json")
    if problem == "missing" and all(file_problem(folder / name) is None for name in ("vocab.json", "merges.txt")):
        return
    if problem is not None:
        reason = "missing (and no vocab.json + merges.txt either)" if problem == "missing" else problem
        problems.append(("tokenizer/tokenizer.json", reason))


def _raise(root: Path, problems: Problems) -> None:
    missing = list(dict.fromkeys(name for name, _ in problems))
    listing = "\n  ".join(f"{name}: {reason}" for name, reason in problems)
    raise IncompleteModelError(
        f"{root} is not a complete Z-Image pipeline:\n  {listing}\n"
        "Download missing files again (files already complete are not fetched twice), or point --model at a "
        "complete Z-Image-Turbo folder.",
        missing=missing,
    )
