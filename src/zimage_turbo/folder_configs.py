"""The configs of a model folder, checked before anything is built from them.

Every value that zimage-turbo, diffusers or transformers reads from a component's config must have the JSON
type it is used as: a string where a number belongs, a list where an object does, or ``null`` for a size would
otherwise surface as a ``TypeError`` or ``AttributeError`` from deep inside a library while loading, as a
failure of the first image, or not at all (a truthy string turns a flag on). Then the configs must describe
Z-Image, and the sizes that different components share must agree, the tokenizer's ids with the text
encoder's vocabulary among them (see :mod:`~zimage_turbo.tokenizer_vocab`). Each problem names its file and
key.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .folder_files import Problems, read_json
from .model import MAX_SEQUENCE_LENGTH
from .request import MAX_SIDE, SIDE_MULTIPLE
from .tokenizer_vocab import check_vocabulary

__all__ = ["CONFIG_CLASSES", "CONFIG_FILES", "SCHEMAS", "TRANSFORMER_KEYS", "check_configs"]

CONFIG_FILES = {
    "transformer": "config.json",
    "text_encoder": "config.json",
    "vae": "config.json",
    "scheduler": "scheduler_config.json",
    "tokenizer": "tokenizer_config.json",
}
# component -> the _class_name its config must have
CONFIG_CLASSES = {
    "transformer": "ZImageTransformer2DModel",
    "vae": "AutoencoderKL",
    "scheduler": "FlowMatchEulerDiscreteScheduler",
}
# Keys without which diffusers would silently fall back to its defaults for another model size.
TRANSFORMER_KEYS = ("dim", "n_layers", "n_heads", "in_channels", "cap_feat_dim", "axes_dims", "axes_lens")
# component -> keys its config must have (the text encoder's sizes are compared with other files')
REQUIRED_KEYS = {"transformer": TRANSFORMER_KEYS, "text_encoder": ("hidden_size", "vocab_size")}


@dataclass(frozen=True)
class Kind:
    """What a config value must be: a test, and the words that say it in a message."""

    words: str
    test: Callable[[object], bool]

    def or_null(self) -> Kind:
        return Kind(f"{self.words}, or null", lambda value: value is None or self.test(value))

    def or_(self, other: Kind) -> Kind:
        return Kind(f"{self.words}, or {other.words}", lambda value: self.test(value) or other.test(value))


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _token(value: object) -> bool:
    """A special token as tokenizer configs store it: its text, or a serialized AddedToken."""
    if isinstance(value, dict):
        return value.get("__type") == "AddedToken" and isinstance(value.get("content"), str)
    return isinstance(value, str)


def _list_of(
    test: Callable[[object], bool], *, length: int | None = None, empty: bool = False
) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, list) or (not value and not empty):
            return False
        return (length is None or len(value) == length) and all(map(test, value))

    return check


def _added_tokens(value: object) -> bool:
    """tokenizer_config.json's added_tokens_decoder: token id (a string of digits) -> the token's properties."""
    return isinstance(value, dict) and all(
        isinstance(key, str) and key.isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str)
        for key, entry in value.items()
    )


def _named_templates(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("template"), str)
        for entry in value
    )


def _torch_dtype(value: object) -> bool:
    import torch

    if not (isinstance(value, str) and value.isidentifier() and not value.startswith("_")):
        return False
    return isinstance(getattr(torch, value, None), torch.dtype)


POSITIVE = Kind("a positive integer", _positive)
COUNT = Kind("a non-negative integer", _count)
NUMBER = Kind("a number", _number)
FLAG = Kind("true or false", lambda value: isinstance(value, bool))
TEXT = Kind("a string", lambda value: isinstance(value, str))
OBJECT = Kind("a JSON object", lambda value: isinstance(value, dict))
SIZES = Kind("a list of positive integers", _list_of(_positive))
AXES = Kind("a list of 3 positive integers", _list_of(_positive, length=3))
NAMES = Kind("a list of strings", _list_of(TEXT.test))
NUMBERS = Kind("a list of numbers", _list_of(_number))
TOKEN = Kind("a token (a string, or an AddedToken object with its content)", _token)
TOKENS = Kind("a list of tokens", _list_of(_token, empty=True))
NAMED_TOKENS = Kind(
    "an object of named tokens", lambda value: isinstance(value, dict) and all(map(_token, value.values()))
)
DTYPE = Kind("the name of a torch dtype", _torch_dtype)

# component -> key -> what its value must be: every key that zimage-turbo, diffusers (the constructors of
# ZImageTransformer2DModel, AutoencoderKL and FlowMatchEulerDiscreteScheduler) or transformers (Qwen3Config,
# the Qwen2 tokenizer) reads and that a Z-Image folder may hold. Absent keys take the libraries' defaults.
SCHEMAS: dict[str, dict[str, Kind]] = {
    "transformer": {
        **dict.fromkeys(("dim", "n_layers", "n_heads", "n_kv_heads", "in_channels", "cap_feat_dim"), POSITIVE),
        "n_refiner_layers": COUNT,
        "all_patch_size": SIZES,
        "all_f_patch_size": SIZES,
        "axes_dims": AXES,
        "axes_lens": AXES,
        **dict.fromkeys(("norm_eps", "rope_theta", "t_scale"), NUMBER),
        "qk_norm": FLAG,
        "siglip_feat_dim": POSITIVE.or_null(),
    },
    "vae": {
        **dict.fromkeys(
            ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"), POSITIVE
        ),
        "block_out_channels": SIZES,
        "down_block_types": NAMES,
        "up_block_types": NAMES,
        "act_fn": TEXT,
        "sample_size": POSITIVE.or_(SIZES),
        "scaling_factor": NUMBER,
        "shift_factor": NUMBER,  # ZImagePipeline adds it to the latents: null is a TypeError at the first image
        "latents_mean": NUMBERS.or_null(),
        "latents_std": NUMBERS.or_null(),
        **dict.fromkeys(("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"), FLAG),
    },
    "scheduler": {
        **dict.fromkeys(("num_train_timesteps", "base_image_seq_len", "max_image_seq_len"), POSITIVE),
        # ZImagePipeline computes the shift from base_shift and max_shift even when use_dynamic_shifting is off
        **dict.fromkeys(("shift", "base_shift", "max_shift"), NUMBER),
        "shift_terminal": NUMBER.or_null(),
        **dict.fromkeys(
            (
                "use_dynamic_shifting",
                "invert_sigmas",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "stochastic_sampling",
            ),
            FLAG,
        ),
        "time_shift_type": TEXT,
    },
    "text_encoder": {
        **dict.fromkeys(
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "head_dim",
                "max_position_embeddings",
            ),
            POSITIVE,
        ),
        "num_key_value_heads": POSITIVE.or_null(),
        "max_window_layers": COUNT,
        "sliding_window": COUNT.or_null(),
        "hidden_act": TEXT,
        **dict.fromkeys(("initializer_range", "rms_norm_eps", "attention_dropout", "rope_theta"), NUMBER),
        "rope_parameters": OBJECT.or_null(),
        "rope_scaling": OBJECT.or_null(),
        **dict.fromkeys(("use_cache", "tie_word_embeddings", "attention_bias", "use_sliding_window"), FLAG),
        "layer_types": NAMES.or_null(),
        "pad_token_id": COUNT.or_null(),
        "bos_token_id": COUNT.or_null(),
        "eos_token_id": COUNT.or_(Kind("a list of them", _list_of(_count))).or_null(),
        "dtype": DTYPE.or_null(),
        "torch_dtype": DTYPE.or_null(),
    },
    "tokenizer": {
        **dict.fromkeys(
            ("bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token"), TOKEN.or_null()
        ),
        "pad_token": TOKEN,  # the pipeline pads every prompt to the same length
        "additional_special_tokens": TOKENS,
        "extra_special_tokens": TOKENS.or_(NAMED_TOKENS),
        "added_tokens_decoder": Kind("an object of token ids and their tokens", _added_tokens),
        "model_max_length": NUMBER.or_null(),
        "add_prefix_space": FLAG.or_null(),
        "split_special_tokens": FLAG,
        "chat_template": TEXT.or_(Kind("a list of named templates", _named_templates)).or_null(),
    },
}


def check_configs(root: Path, problems: Problems) -> None:
    """The component configs have the types their readers expect, describe Z-Image, and agree with each other
    (files already reported missing or unreadable are skipped)."""
    configs: dict[str, dict[str, Any]] = {}
    for component, name in CONFIG_FILES.items():
        label = f"{component}/{name}"
        path = root / component / name
        if any(reported == label for reported, _ in problems):
            continue
        data = read_json(path, problems, label)
        if data is None:
            continue
        found = len(problems)
        _check_types(data, component, label, problems)
        if len(problems) == found:  # only configs of the right types take part in the checks below
            configs[component] = data
        expected = CONFIG_CLASSES.get(component)
        if expected is not None and data.get("_class_name") != expected:
            problems.append((label, f"_class_name is {_shown(data.get('_class_name'))}, expected {expected!r}"))
    transformer = configs.get("transformer")
    if transformer is not None:
        _check_transformer(transformer, problems)
    text = configs.get("text_encoder")
    if text is not None:
        _check_text_encoder(text, transformer, problems)
    tokenizer = configs.get("tokenizer")
    if text is not None and tokenizer is not None:
        check_vocabulary(root / "tokenizer", tokenizer, text["vocab_size"], problems)
    vae = configs.get("vae")
    if vae is not None and transformer is not None and vae.get("latent_channels") != transformer["in_channels"]:
        problems.append(
            (
                "vae/config.json",
                f"latent_channels {_shown(vae.get('latent_channels'))} does not match the transformer's in_channels "
                f"{transformer['in_channels']}",
            )
        )


def _check_types(data: Mapping[str, Any], component: str, label: str, problems: Problems) -> None:
    required = REQUIRED_KEYS.get(component, ())
    missing = [key for key in required if key not in data]
    if missing:
        problems.append((label, f"lacks the Z-Image {component} keys {', '.join(missing)}"))
    for key, kind in SCHEMAS[component].items():
        if key in data and not kind.test(data[key]):
            problems.append((label, f"{key} is {_shown(data[key])}, expected {kind.words}"))


def _shown(value: object) -> str:
    """A config value as it is written in the file, shortened."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_transformer(transformer: Mapping[str, Any], problems: Problems) -> None:

    label = "transformer/config.json"
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


def _check_text_encoder(text: Mapping[str, Any], transformer: Mapping[str, Any] | None, problems: Problems) -> None:

    label = "text_encoder/config.json"
    if text.get("model_type") != "qwen3":
        problems.append((label, f"model_type is {_shown(text.get('model_type'))}, expected 'qwen3' (Qwen3)"))
    hidden = text["hidden_size"]
    if transformer is not None and hidden != transformer["cap_feat_dim"]:
        problems.append(
            (label, f"hidden_size {hidden} does not match the transformer's cap_feat_dim {transformer['cap_feat_dim']}")
        )
    positions = text.get("max_position_embeddings", MAX_SEQUENCE_LENGTH)
    if positions < MAX_SEQUENCE_LENGTH:
        problems.append(
            (label, f"max_position_embeddings is {positions}; prompts take up to {MAX_SEQUENCE_LENGTH} tokens")
        )
