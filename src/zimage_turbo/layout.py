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

The configs must describe Z-Image: the classes and libraries ``model_index.json`` names come from a fixed
list (nothing is ever imported from the folder itself), the transformer config has the Z-Image keys, and the
sizes that have to agree between components (caption features and text encoder width, latent channels) do,
as do the RoPE tables with the largest request we accept. A mismatch found here is named with its file;
found while loading, it would be a shape error in the middle of a 20 GB load, or on a GPU a device-side
assert that ends the process's use of CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import IncompleteModelError
from .folder_files import Problems, file_problem, read_json
from .request import MAX_SIDE, SIDE_MULTIPLE
from .weight_files import choose_weight_files

__all__ = ["PIPELINE_CLASS", "WEIGHTED_COMPONENTS", "PipelineLayout", "check_pipeline_dir"]

PIPELINE_CLASS = "ZImagePipeline"
# component -> the class names diffusers/transformers may record for it in model_index.json
EXPECTED_CLASSES: dict[str, tuple[str, ...]] = {
    "transformer": ("ZImageTransformer2DModel",),
    "text_encoder": ("Qwen3Model", "Qwen3ForCausalLM"),
    "vae": ("AutoencoderKL",),
    "tokenizer": ("Qwen2Tokenizer", "Qwen2TokenizerFast", "PreTrainedTokenizerFast", "TokenizersBackend"),
    "scheduler": ("FlowMatchEulerDiscreteScheduler",),
}
# component -> the library model_index.json must name for it
EXPECTED_LIBRARIES = {
    "transformer": "diffusers",
    "vae": "diffusers",
    "scheduler": "diffusers",
    "text_encoder": "transformers",
    "tokenizer": "transformers",
}
# Keys without which diffusers would silently fall back to its defaults for another model size.
TRANSFORMER_KEYS = ("dim", "n_layers", "n_heads", "in_channels", "cap_feat_dim", "axes_dims", "axes_lens")
CONFIG_FILES = {
    "transformer": "config.json",
    "text_encoder": "config.json",
    "vae": "config.json",
    "scheduler": "scheduler_config.json",
    "tokenizer": "tokenizer_config.json",
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
        problems.append(("model_index.json", f"pipeline class is {class_name!r}, expected {PIPELINE_CLASS!r}"))

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
    _check_configs(root, problems)

    if problems:
        _raise(root, problems)
    return PipelineLayout(root=root, weight_files=weight_files, classes=classes)


def _check_configs(root: Path, problems: Problems) -> None:
    """The component configs describe Z-Image, and agree with each other (files already reported missing or
    unreadable are skipped)."""
    from .profile import MAX_SEQUENCE_LENGTH  # profile imports this module

    configs: dict[str, dict[str, Any]] = {}
    for component, name in CONFIG_FILES.items():
        path = root / component / name
        if path.is_file() and not any(label == f"{component}/{name}" for label, _ in problems):
            data = read_json(path, problems, f"{component}/{name}")
            if data is not None:
                configs[component] = data

    def expect_class(component: str, expected: str) -> None:
        found = configs[component].get("_class_name")
        if found != expected:
            problems.append(
                (f"{component}/{CONFIG_FILES[component]}", f"_class_name is {found!r}, expected {expected!r}")
            )

    transformer = configs.get("transformer")
    label = "transformer/config.json"
    if transformer is not None:
        expect_class("transformer", EXPECTED_CLASSES["transformer"][0])
        missing = [key for key in TRANSFORMER_KEYS if key not in transformer]
        if missing:
            problems.append((label, f"lacks the Z-Image transformer keys {', '.join(missing)}"))
            transformer = None
    if transformer is not None:
        sizes = {key: transformer[key] for key in ("dim", "n_layers", "n_heads", "in_channels", "cap_feat_dim")}
        axes = {key: transformer[key] for key in ("axes_dims", "axes_lens")}
        bad = [key for key, value in sizes.items() if not _positive_int(value)]
        bad += [key for key, value in axes.items() if not (isinstance(value, list) and len(value) == 3)]
        bad += [key for key, value in axes.items() if isinstance(value, list) and not all(map(_positive_int, value))]
        if bad:
            problems.append((label, f"{', '.join(dict.fromkeys(bad))}: not positive integers as Z-Image has"))
            transformer = None
    if transformer is not None:
        dim, heads = transformer["dim"], transformer["n_heads"]
        axes_dims, axes_lens = transformer["axes_dims"], transformer["axes_lens"]
        if dim % heads or sum(axes_dims) != dim // heads:
            problems.append((label, f"axes_dims {axes_dims} must add up to the head size dim/n_heads = {dim}/{heads}"))
        patches = MAX_SIDE // SIDE_MULTIPLE
        # Caption positions run from 1 to 512 and the image's start after them; image rows and columns take one
        # position per 16 pixels. An index past a RoPE table is a device-side assert on a GPU.
        if axes_lens[0] < MAX_SEQUENCE_LENGTH + 2 or min(axes_lens[1:]) < patches:
            problems.append(
                (
                    label,
                    f"axes_lens {axes_lens} is too small: Z-Image needs at least {MAX_SEQUENCE_LENGTH + 2} caption "
                    f"positions and {patches} rows and columns ({MAX_SIDE} pixels)",
                )
            )

    text = configs.get("text_encoder")
    label = "text_encoder/config.json"
    if text is not None:
        if text.get("model_type") != "qwen3":
            problems.append((label, f"model_type is {text.get('model_type')!r}, expected 'qwen3' (Qwen3)"))
        hidden = text.get("hidden_size")
        if not _positive_int(hidden):
            problems.append((label, f"hidden_size is {hidden!r}, expected a positive integer"))
        elif transformer is not None and hidden != transformer["cap_feat_dim"]:
            problems.append(
                (
                    label,
                    f"hidden_size {hidden} does not match the transformer's cap_feat_dim {transformer['cap_feat_dim']}",
                )
            )
        positions = text.get("max_position_embeddings", MAX_SEQUENCE_LENGTH)
        if not _positive_int(positions) or positions < MAX_SEQUENCE_LENGTH:
            problems.append(
                (label, f"max_position_embeddings is {positions!r}; prompts take up to {MAX_SEQUENCE_LENGTH} tokens")
            )

    vae = configs.get("vae")
    if vae is not None:
        expect_class("vae", EXPECTED_CLASSES["vae"][0])
        latent = vae.get("latent_channels")
        if transformer is not None and latent != transformer["in_channels"]:
            problems.append(
                (
                    "vae/config.json",
                    f"latent_channels {latent!r} does not match the transformer's in_channels "
                    f"{transformer['in_channels']}",
                )
            )
    if "scheduler" in configs:
        expect_class("scheduler", EXPECTED_CLASSES["scheduler"][0])


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
