from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zimage_turbo import CheckpointError, __version__, check_pipeline_dir, make_checkpoint
from zimage_turbo.checkpoints import MARKER_FILE, PRESETS, read_marker


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_checkpoint_is_small_complete_and_marked(tiny_checkpoint: Path) -> None:
    size = sum(len(data) for data in _files(tiny_checkpoint).values())
    assert size < 5 * 1024 * 1024
    layout = check_pipeline_dir(tiny_checkpoint)
    assert layout.classes == {
        "transformer": "ZImageTransformer2DModel",
        "text_encoder": "Qwen3Model",
        "vae": "AutoencoderKL",
        "tokenizer": "Qwen2Tokenizer",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
    }
    assert read_marker(tiny_checkpoint) == {
        "preset": "tiny",
        "seed": 0,
        "random_weights": True,
        "zimage_turbo": __version__,
    }


def test_same_seed_same_bytes_other_seed_other_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    again = make_checkpoint("tiny", tmp_path / "again")
    assert _files(again) == _files(tiny_checkpoint)
    other = make_checkpoint("tiny", tmp_path / "other", seed=1)
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert _files(other)[name] != _files(tiny_checkpoint)[name]


def test_plain_diffusers_loads_it_and_the_scheduler_is_turbo_s(tiny_checkpoint: Path) -> None:
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_checkpoint)
    assert pipe.scheduler.config.shift == 3.0
    assert pipe.scheduler.config.use_dynamic_shifting is False
    assert pipe.vae_scale_factor == 8  # Flux-style VAE: 4 levels
    assert list(pipe.transformer.config.axes_lens) == [1536, 512, 512]
    template = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a cat"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    assert template == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    # Special tokens stay whole; any text (here Chinese and emoji) encodes through byte-level BPE.
    ids = pipe.tokenizer(template + "你好 🦊").input_ids
    assert ids[0] == pipe.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert pipe.tokenizer.decode(ids) == template + "你好 🦊"


def test_full_preset_has_the_real_parameter_counts() -> None:
    """Counted on the meta device: no memory, but the same classes and configs the GPU build uses."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    spec = PRESETS["full"]
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(**spec.transformer)
        text_encoder = Qwen3Model(
            Qwen3Config(vocab_size=151936, **{k: v for k, v in spec.text_encoder.items() if k != "vocab_size"})
        )
        vae = AutoencoderKL(**spec.vae)

    def billions(module: torch.nn.Module) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e9

    assert billions(transformer) == pytest.approx(6.15, abs=0.01)
    assert billions(text_encoder) == pytest.approx(4.02, abs=0.01)
    assert billions(vae) * 1000 == pytest.approx(84, abs=1)
    assert spec.dtype == torch.bfloat16
    assert spec.transformer["axes_dims"] == [32, 48, 48]


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        make_checkpoint("tiny", target)
    # Even when asked to overwrite, a folder we did not make is never deleted.
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        make_checkpoint("tiny", target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_our_own_checkpoint(tmp_path: Path) -> None:
    first = make_checkpoint("tiny", tmp_path / "ckpt", seed=1)
    second = make_checkpoint("tiny", tmp_path / "ckpt", seed=2, overwrite=True)
    assert first == second
    assert json.loads((second / MARKER_FILE).read_text())["seed"] == 2


def test_an_empty_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert check_pipeline_dir(make_checkpoint("tiny", tmp_path / "empty"))


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zimage_turbo.checkpoints as checkpoints

    def fail(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "build_toy_tokenizer", fail)
    with pytest.raises(KeyboardInterrupt):
        make_checkpoint("tiny", tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_unknown_preset() -> None:
    with pytest.raises(CheckpointError, match="tiny, full"):
        make_checkpoint("medium", "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"preset": ["tiny"]}, "unknown preset"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"preset": "full", "device": "gpu0"}, "torch device"),
        ({"preset": "full", "device": "cuda:7"}, "cannot build on cuda:7"),
        ({"preset": "full", "device": "meta"}, "not supported"),
        ({"preset": "tiny", "device": "gpu0"}, "torch device"),  # built on the CPU, but a typo is still said
        ({"path": 42}, "folder path"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_built(
    tmp_path: Path, arguments: dict[str, object], message: str
) -> None:
    if "cuda" in str(arguments.get("device")) and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    call: dict[str, object] = {"preset": "tiny", "path": tmp_path / "ckpt", **arguments}
    with pytest.raises(CheckpointError, match=message):
        make_checkpoint(call.pop("preset"), call.pop("path"), **call)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
