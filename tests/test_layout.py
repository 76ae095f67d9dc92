from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from zimage_turbo import IncompleteModelError, check_pipeline_dir


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
        ("vae/diffusion_pytorch_model.safetensors", "vae/*.safetensors"),
        ("text_encoder/model.safetensors", "text_encoder/*.safetensors"),
        ("transformer/diffusion_pytorch_model.safetensors", "transformer/*.safetensors"),
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
