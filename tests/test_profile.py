from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from zimage_turbo import IncompleteModelError, ModelProfile, Workload, check_pipeline_dir
from zimage_turbo.activation_model import load_calibration
from zimage_turbo.profile import read_safetensors_shapes

GB = 1e9


def test_sizes_from_headers_match_the_loaded_modules(tiny_checkpoint: Path) -> None:
    from diffusers import ZImagePipeline

    profile = ModelProfile.from_layout(check_pipeline_dir(tiny_checkpoint), dtype_bytes=4)
    pipe = ZImagePipeline.from_pretrained(tiny_checkpoint)
    for name in ("transformer", "text_encoder", "vae"):
        module = getattr(pipe, name)
        loaded = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        assert getattr(profile, name).weight_bytes == loaded, name
    assert profile.transformer.block_names == ("noise_refiner.0", "context_refiner.0", "layers.0", "layers.1")
    assert profile.text_encoder.block_names == ("layers.0", "layers.1")
    assert profile.transformer_dim == 64 and profile.text_hidden == 32 and profile.vae_channels == 16


def test_live_modules_give_the_same_profile(tiny_checkpoint: Path) -> None:
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_checkpoint)
    live = ModelProfile.from_modules({n: getattr(pipe, n) for n in ("transformer", "text_encoder", "vae")})
    headers = ModelProfile.from_layout(check_pipeline_dir(tiny_checkpoint), dtype_bytes=4)
    assert live.transformer.block_bytes == headers.transformer.block_bytes
    assert live.vae.weight_bytes == headers.vae.weight_bytes


def test_the_real_model_without_downloading_it() -> None:
    profile = ModelProfile.z_image_turbo()
    assert profile.transformer.weight_bytes / GB == pytest.approx(12.31, abs=0.01)
    assert profile.text_encoder.weight_bytes / GB == pytest.approx(8.04, abs=0.01)
    assert profile.vae.weight_bytes / GB == pytest.approx(0.168, abs=0.001)
    names = profile.transformer.block_names
    assert len(names) == 34 and names[:2] == ("noise_refiner.0", "noise_refiner.1") and names[-1] == "layers.29"
    assert names.index("layers.10") == names.index("layers.9") + 1  # numeric, not alphabetical order
    assert profile.text_encoder.largest_tensor_bytes == 151936 * 2560 * 2  # the token embedding
    assert profile.transformer.other_bytes < 0.1 * GB
    # A pass at 1024x1024 is about 60 TFLOP (DESIGN.md).
    assert profile.transformer_pass_tflop(Workload()) == pytest.approx(60, rel=0.05)


def test_float32_weights_are_counted_at_the_run_dtype() -> None:
    assert ModelProfile.z_image_turbo(dtype_bytes=4).weight_bytes == 2 * ModelProfile.z_image_turbo().weight_bytes


def test_activations_grow_with_the_workload_and_tiling_caps_the_decode() -> None:
    profile = ModelProfile.z_image_turbo()
    small, big = Workload(512, 512), Workload(2048, 2048)
    for phase in ("denoise", "decode"):
        assert profile.activation_bytes(small)[phase] < profile.activation_bytes(big)[phase]
    assert profile.activation_bytes(Workload(images=2))["decode"] == 2 * profile.activation_bytes(Workload())["decode"]
    assert (
        profile.activation_bytes(Workload(guidance=True))["denoise"]
        == 2 * profile.activation_bytes(Workload())["denoise"]
    )
    tiled = profile.activation_bytes(Workload(2048, 2048, vae_tiling=True))["decode"]
    assert tiled < profile.activation_bytes(big)["decode"] / 3


def test_calibration_is_shipped_with_its_provenance() -> None:
    calibration = load_calibration()
    assert calibration.transformer_k > 0 and calibration.pinned_gib_per_s > 0
    assert calibration.source


def _write_header(path: Path, header: dict[str, object], data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_header_reader_refuses_truncated_files(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    _write_header(good, {"w": {"dtype": "BF16", "shape": [4, 2], "data_offsets": [0, 16]}}, b"\0" * 16)
    assert read_safetensors_shapes(good) == {"w": ("BF16", (4, 2))}
    short = tmp_path / "short.safetensors"
    _write_header(short, {"w": {"dtype": "BF16", "shape": [4, 2], "data_offsets": [0, 16]}}, b"\0" * 10)
    with pytest.raises(IncompleteModelError, match="truncated"):
        read_safetensors_shapes(short)
    tiny = tmp_path / "seven.safetensors"
    tiny.write_bytes(b"\x01" * 7)
    with pytest.raises(IncompleteModelError, match="truncated"):
        read_safetensors_shapes(tiny)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(IncompleteModelError, match="header"):
        read_safetensors_shapes(huge)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{{")
    with pytest.raises(IncompleteModelError, match="unreadable"):
        read_safetensors_shapes(garbage)


def test_a_truncated_shard_is_caught_when_profiling(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(IncompleteModelError, match=r"diffusion_pytorch_model\.safetensors"):
        ModelProfile.from_layout(check_pipeline_dir(copy))


def test_no_weights_are_read(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(torch, "load", forbidden)
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    ModelProfile.from_layout(check_pipeline_dir(tiny_checkpoint))
