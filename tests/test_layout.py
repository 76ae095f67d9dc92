from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from zimage_turbo import IncompleteModelError, check_pipeline_dir
from zimage_turbo.host import HostHomes
from zimage_turbo.loader import load_pipeline

SINGLE = {
    "transformer": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
}


@pytest.fixture
def model(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, copy)
    return copy


def _shard(model: Path, component: str = "transformer", parts: int = 2) -> list[str]:
    """Split a component's single safetensors file into `parts` shards with an index, like big checkpoints."""
    from safetensors.torch import load_file, save_file

    single = model / component / "diffusion_pytorch_model.safetensors"
    tensors = load_file(single)
    single.unlink()
    names = sorted(tensors)
    shard_names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{parts:05d}.safetensors" for i in range(parts)]
    weight_map = {}
    for i, shard in enumerate(shard_names):
        chunk = {n: tensors[n] for n in names[i::parts]}
        save_file(chunk, model / component / shard)
        weight_map.update(dict.fromkeys(chunk, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (model / component / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return shard_names


def test_complete_folder_passes_and_lists_weights(model: Path) -> None:
    layout = check_pipeline_dir(model)
    assert layout.root == model
    assert set(layout.weight_files) == {"transformer", "text_encoder", "vae"}
    assert all(path.is_file() for c in layout.weight_files for path in layout.weight_paths(c))
    assert layout.classes["text_encoder"] == "Qwen3Model"


def test_sharded_weights_are_listed_in_order(model: Path) -> None:
    shards = _shard(model)
    assert check_pipeline_dir(model).weight_files["transformer"] == tuple(f"transformer/{s}" for s in shards)


def test_missing_shard_is_named(model: Path) -> None:
    shards = _shard(model)
    (model / "transformer" / shards[1]).unlink()
    with pytest.raises(IncompleteModelError) as caught:
        check_pipeline_dir(model)
    assert caught.value.missing == (f"transformer/{shards[1]}",)
    assert shards[1] in str(caught.value)


@pytest.mark.parametrize(
    ("removed", "reported"),
    [
        ("model_index.json", "model_index.json"),
        ("transformer/config.json", "transformer/config.json"),
        ("text_encoder/config.json", "text_encoder/config.json"),
        ("vae/config.json", "vae/config.json"),
        ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json"),
        ("tokenizer/tokenizer_config.json", "tokenizer/tokenizer_config.json"),
        ("tokenizer/tokenizer.json", "tokenizer/tokenizer.json"),
        ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
        ("text_encoder/model.safetensors", "text_encoder/model.safetensors"),
        ("transformer/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors"),
    ],
)
def test_every_missing_file_is_named(model: Path, removed: str, reported: str) -> None:
    (model / removed).unlink()
    with pytest.raises(IncompleteModelError) as caught:
        check_pipeline_dir(model)
    assert caught.value.missing == (reported,)
    assert reported in str(caught.value)


def test_all_problems_are_reported_at_once(model: Path) -> None:
    (model / "vae" / "config.json").unlink()
    (model / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(IncompleteModelError) as caught:
        check_pipeline_dir(model)
    assert set(caught.value.missing) == {"vae/config.json", "scheduler/scheduler_config.json"}


def test_pickle_only_weights_are_refused_by_name(model: Path) -> None:
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(model / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(IncompleteModelError, match=r"pickle files \(diffusion_pytorch_model.bin\)"):
        check_pipeline_dir(model)


def test_other_pipeline_is_refused(model: Path) -> None:
    index = json.loads((model / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(IncompleteModelError, match="FluxPipeline"):
        check_pipeline_dir(model)


def test_wrong_component_class_is_refused(model: Path) -> None:
    index = json.loads((model / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(IncompleteModelError, match="FluxTransformer2DModel"):
        check_pipeline_dir(model)


def test_corrupt_model_index_is_reported(model: Path) -> None:
    (model / "model_index.json").write_text("{not json")
    with pytest.raises(IncompleteModelError, match=r"model_index\.json: unreadable"):
        check_pipeline_dir(model)


@pytest.mark.parametrize("bad_name", ["../../etc/passwd", "/abs/shard.safetensors", "sub/shard.safetensors"])
def test_shard_names_that_leave_the_folder_are_refused(model: Path, bad_name: str) -> None:
    _shard(model)
    index_path = model / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = bad_name
    index_path.write_text(json.dumps(index))
    with pytest.raises(IncompleteModelError, match="not a plain file name"):
        check_pipeline_dir(model)


# -- which files are the weights -----------------------------------------------------------------------------


def _zeroed_copy(model: Path, component: str, name: str) -> None:
    """A file of the component's tensors, all zero, in float16: what a broken fp16 variant would hold."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / component / SINGLE[component])
    zeros = {key: torch.zeros(value.shape, dtype=torch.float16) for key, value in tensors.items()}
    save_file(zeros, model / component / name)


def _lora(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"lora_A.weight": torch.ones(4, 8), "lora_B.weight": torch.ones(8, 4)}, path)


@pytest.mark.parametrize(
    ("component", "stray", "variant"),
    [
        ("vae", "diffusion_pytorch_model.fp16.safetensors", True),
        ("vae", "a_lora.safetensors", False),
        ("text_encoder", "model.fp16.safetensors", True),
        ("text_encoder", "adapter.safetensors", False),
        ("transformer", "diffusion_pytorch_model.bf16.safetensors", True),
    ],
)
def test_weights_are_the_files_of_the_expected_name_whatever_else_is_there(
    model: Path, component: str, stray: str, variant: bool, caplog: pytest.LogCaptureFixture
) -> None:
    before = check_pipeline_dir(model).weight_files
    if variant:
        _zeroed_copy(model, component, stray)
    else:
        _lora(model / component / stray)
    with caplog.at_level(logging.DEBUG, logger="zimage_turbo.weight_files"):
        assert check_pipeline_dir(model).weight_files == before
    assert stray in caplog.text  # ignored, but said so at debug level


def test_a_zeroed_variant_and_a_lora_beside_the_weights_do_not_change_what_is_loaded(model: Path) -> None:
    from safetensors.torch import load_file

    _zeroed_copy(model, "vae", "diffusion_pytorch_model.fp16.safetensors")
    _lora(model / "vae" / "a_lora.safetensors")
    pipe = load_pipeline(
        check_pipeline_dir(model), dtype=torch.float32, targets={}, homes=HostHomes(pin=False), progress=False
    )
    stored = load_file(model / "vae" / SINGLE["vae"])
    loaded = pipe.vae.state_dict()
    assert stored.keys() <= loaded.keys()
    assert all(torch.equal(loaded[key], value) for key, value in stored.items())


def test_only_variant_weights_are_refused_naming_them(model: Path) -> None:
    vae = model / "vae"
    (vae / SINGLE["vae"]).rename(vae / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(IncompleteModelError) as caught:
        check_pipeline_dir(model)
    assert caught.value.missing == ("vae/diffusion_pytorch_model.safetensors",)
    assert "diffusion_pytorch_model.fp16.safetensors" in str(caught.value) and "variant" in str(caught.value)


def test_a_single_file_beside_an_index_is_refused_naming_both(model: Path, tiny_checkpoint: Path) -> None:
    _shard(model)
    single = Path("transformer") / SINGLE["transformer"]
    shutil.copyfile(tiny_checkpoint / single, model / single)
    with pytest.raises(IncompleteModelError) as caught:
        check_pipeline_dir(model)
    message = str(caught.value)
    assert "transformer/diffusion_pytorch_model.safetensors" in message
    assert "diffusion_pytorch_model.safetensors.index.json" in message


def test_shards_without_their_index_are_named(model: Path) -> None:
    shards = _shard(model)
    (model / "transformer" / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(IncompleteModelError, match=r"not diffusion_pytorch_model\.safetensors\.index\.json") as caught:
        check_pipeline_dir(model)
    assert shards[0] in str(caught.value)


def test_a_stray_file_alone_is_not_taken_for_the_weights(model: Path) -> None:
    (model / "vae" / SINGLE["vae"]).rename(model / "vae" / "a_lora.safetensors")
    with pytest.raises(IncompleteModelError, match=r"a_lora\.safetensors is not loaded") as caught:
        check_pipeline_dir(model)
    assert caught.value.missing == ("vae/diffusion_pytorch_model.safetensors",)


@pytest.mark.parametrize(
    "victim",
    [
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/config.json",
        "tokenizer/tokenizer.json",
    ],
)
@pytest.mark.parametrize("damage", ["broken link", "folder"])
def test_a_file_that_is_a_broken_link_or_a_folder_is_named(model: Path, victim: str, damage: str) -> None:
    if "00002" in victim or "index" in victim:
        _shard(model)
    path = model / victim
    path.unlink()
    if damage == "broken link":
        path.symlink_to(model / "deleted-blob")
    else:
        path.mkdir()
    with pytest.raises(IncompleteModelError) as caught:
        check_pipeline_dir(model)
    assert caught.value.missing == (victim,)
    assert ("broken link" if damage == "broken link" else "not a file") in str(caught.value)


# -- config values of the wrong type -------------------------------------------------------------------------

# file -> key -> wrong values: for every config, values of the wrong JSON type for keys that zimage-turbo,
# diffusers or transformers read. Each must be refused by the folder check, naming the file and the key, and
# never escape as a TypeError, AttributeError or KeyError (while checking, loading or at the first image).
WRONG_TYPES: dict[str, dict[str, list[object]]] = {
    "model_index.json": {
        "_class_name": [None, 5, ["ZImagePipeline"]],
        "transformer": ["ZImageTransformer2DModel", None, {"diffusers": "ZImageTransformer2DModel"}, ["diffusers"]],
        "vae": [["diffusers", None], ["diffusers", 5], [None, "AutoencoderKL"]],
        "tokenizer": [["transformers", ["Qwen2Tokenizer"]]],
    },
    "transformer/config.json": {
        "_class_name": [None, ["ZImageTransformer2DModel"]],
        "dim": ["64", None, 64.0, [64]],
        "n_heads": ["2", True],
        "cap_feat_dim": [None, "32"],
        "in_channels": [16.5],
        "n_refiner_layers": ["1", None, 1.5],
        "n_kv_heads": ["2"],
        "all_patch_size": [2, None, ["2"]],
        "all_f_patch_size": [1, "1"],
        "axes_dims": ["x", None, [8, 8], ["8", 4, 4]],
        "axes_lens": [{"caption": 1536}, None],
        "norm_eps": ["1e-5", None],
        "rope_theta": ["256", [256.0]],
        "t_scale": [None],
        "qk_norm": ["true", None, 1],
        "siglip_feat_dim": ["x", [1]],
    },
    "vae/config.json": {
        "_class_name": [None],
        "block_out_channels": ["x", None, {"0": 16}, [16, "16"], []],
        "down_block_types": [None, "DownEncoderBlock2D", [1]],
        "up_block_types": [None, 5],
        "act_fn": [None, ["silu"]],
        "in_channels": ["3", None],
        "latent_channels": ["16", None],
        "layers_per_block": ["1", 1.0],
        "norm_num_groups": [None],
        "sample_size": ["1024", None],
        "scaling_factor": ["0.3611", None],
        "shift_factor": ["0.1159", None],
        "latents_mean": ["x", [None]],
        "force_upcast": ["yes"],
        "use_quant_conv": ["false"],
        "mid_block_add_attention": [None],
    },
    "scheduler/scheduler_config.json": {
        "_class_name": [{"name": "FlowMatchEulerDiscreteScheduler"}],
        "num_train_timesteps": ["1000", None, 1000.0],
        "shift": ["3", None, [3.0]],
        "use_dynamic_shifting": ["false", None, 0],
        "base_shift": ["0.5", None],
        "max_shift": [None],
        "max_image_seq_len": [None],
        "time_shift_type": [["exponential"], None],
        "use_karras_sigmas": [None, "no"],
        "use_beta_sigmas": ["x"],
        "shift_terminal": ["x"],
    },
    "text_encoder/config.json": {
        "vocab_size": ["719", None],
        "hidden_size": ["32", None, 32.0],
        "num_hidden_layers": [None],
        "num_attention_heads": ["2"],
        "num_key_value_heads": ["1"],
        "head_dim": [None],
        "intermediate_size": [[64]],
        "max_position_embeddings": ["1024"],
        "hidden_act": [None, 5],
        "rms_norm_eps": ["1e-6", None],
        "tie_word_embeddings": ["true"],
        "use_cache": [None],
        "rope_parameters": ["x", [1]],
        "layer_types": ["full_attention"],
        "dtype": ["x", ["float32"]],
        "eos_token_id": ["x", [1, "2"]],
    },
    "tokenizer/tokenizer_config.json": {
        "eos_token": [["<|im_end|>"], {"content": "<|im_end|>"}, 5],
        "pad_token": [None, 5],
        "unk_token": [{"a": 1}],
        "extra_special_tokens": ["x", [1], {"image": 1}],
        "additional_special_tokens": ["<|im_start|>"],
        "added_tokens_decoder": [[1], {"x": {"content": "a"}}, {"1": 5}],
        "model_max_length": ["x", [1]],
        "add_prefix_space": ["x"],
        "split_special_tokens": ["x"],
        "chat_template": [5, [1]],
    },
}
WRONG_TYPE_CASES = [
    (file, key, value) for file, keys in WRONG_TYPES.items() for key, values in keys.items() for value in values
]
WRONG_TYPE_IDS = [f"{file}:{key}={value!r}" for file, key, value in WRONG_TYPE_CASES]


@pytest.fixture
def light_model(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint's files, with links to its weights (nothing here writes them)."""

    def copy(source: str, target: str) -> None:
        if source.endswith(".safetensors"):
            os.symlink(source, target)
        else:
            shutil.copy2(source, target)

    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "model", copy_function=copy))


@pytest.mark.parametrize(
    ("file", "key", "value"), WRONG_TYPE_CASES, ids=[f"{f}:{k}={v!r}" for f, k, v in WRONG_TYPE_CASES]
)
def test_a_config_value_of_the_wrong_type_is_refused_naming_file_and_key(
    light_model: Path, file: str, key: str, value: object
) -> None:
    path = light_model / file
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(IncompleteModelError) as caught:
        check_pipeline_dir(light_model)
    assert file in caught.value.missing
    lines = [line.strip() for line in str(caught.value).splitlines() if line.strip().startswith(f"{file}:")]
    assert any(key in line for line in lines), str(caught.value)
