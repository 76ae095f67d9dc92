"""Loading safety: only safetensors, no remote code, and a damaged or foreign checkpoint refused before any
weight is loaded, with the file named; downloads refused before any byte when the disk is too small."""

from __future__ import annotations

import ast
import builtins
import hashlib
import json
import pickle
import re
import shutil
import struct
import sys
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import zimage_turbo
import zimage_turbo.placement as placement_module
from hub_caches import huggingface_cache, modelscope_cache
from test_layout import _shard
from zimage_turbo import (
    Generator,
    IncompleteModelError,
    NotEnoughDiskSpaceError,
    ZImageSettings,
    resolve_model,
)
from zimage_turbo import sources as sources_module
from zimage_turbo.sources import DISK_MARGIN_BYTES, RemoteFile, bytes_to_fetch, check_disk_space

SRC = Path(zimage_turbo.__file__).parent
REPO = "Tongyi-MAI/Z-Image-Turbo"
PROMPT = "a red fox in fresh snow at dawn"


@pytest.fixture
def model(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, copy)
    return copy


@pytest.fixture
def never_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any weights are loaded: every refusal here must come first."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(placement_module, "load_pipeline", refuse)


def refused(folder: Path) -> IncompleteModelError:
    gen = Generator(model=folder, settings=ZImageSettings(progress=False))
    with pytest.raises(IncompleteModelError) as caught:
        gen.generate(PROMPT, height=256, width=256, steps=1, seed=0)
    assert not gen.is_loaded
    return caught.value


# -- damaged weights ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("never_loaded")
def test_a_missing_shard_is_named_before_loading(model: Path) -> None:
    shards = _shard(model)
    (model / "transformer" / shards[0]).unlink()
    error = refused(model)
    assert error.missing == (f"transformer/{shards[0]}",)
    assert shards[0] in str(error)


@pytest.mark.usefixtures("never_loaded")
@pytest.mark.parametrize("cut", ["7 bytes", "header only", "half"])
@pytest.mark.parametrize("where", ["vae", "transformer shard"])
def test_a_truncated_shard_is_named_before_loading(model: Path, cut: str, where: str) -> None:
    if where == "vae":
        victim = model / "vae" / "diffusion_pytorch_model.safetensors"
    else:
        victim = model / "transformer" / _shard(model)[1]
    data = victim.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    keep = {"7 bytes": 7, "header only": 8 + header_length, "half": len(data) // 2}[cut]
    victim.write_bytes(data[:keep])
    error = refused(model)
    assert victim.name in str(error) and "truncated" in str(error)
    assert str(victim) in error.missing


def _write_safetensors(path: Path, header: object, data: bytes = b"\0" * 64) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


@pytest.mark.usefixtures("never_loaded")
@pytest.mark.parametrize(
    ("header", "message"),
    [
        (["not", "an", "object"], "not a JSON object"),
        ({"w": {"shape": [2], "data_offsets": [0, 8]}}, "no dtype"),
        ({"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}, "invalid shape"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "invalid data_offsets"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, "needs 16"),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            "overlap",
        ),
        ({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, "truncated"),
    ],
)
def test_a_malformed_safetensors_header_is_refused_naming_the_file(model: Path, header: object, message: str) -> None:
    victim = model / "vae" / "diffusion_pytorch_model.safetensors"
    _write_safetensors(victim, header)
    error = refused(model)
    assert message in str(error) and str(victim) in str(error)


def test_a_weights_file_that_cannot_be_read_gives_a_typed_error(model: Path) -> None:
    # Checked folders do not hold such files, but one may vanish (or become unreadable) after the check.
    from zimage_turbo import ModelLoadError
    from zimage_turbo.weights import read_safetensors_header

    victim = model / "vae" / "diffusion_pytorch_model.safetensors"
    victim.unlink()
    victim.symlink_to(model / "deleted-blob")
    with pytest.raises(IncompleteModelError, match="broken link") as caught:
        read_safetensors_header(victim)
    assert caught.value.missing == (str(victim),)
    victim.unlink()
    victim.mkdir()
    with pytest.raises(ModelLoadError, match="cannot be read"):
        read_safetensors_header(victim)


# -- configs that do not describe Z-Image ------------------------------------------------------------------


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


CONFIG_MISMATCHES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("model_index.json", lambda d: d.update(transformer=["diffusers", "FluxTransformer2DModel"]), "FluxTransformer"),
    ("model_index.json", lambda d: d.update(vae=["my_models", "AutoencoderKL"]), "library 'my_models'"),
    ("transformer/config.json", lambda d: d.update(_class_name="FluxTransformer2DModel"), "_class_name"),
    ("transformer/config.json", lambda d: [d.pop("axes_lens"), d.pop("dim")], "lacks the Z-Image transformer keys"),
    ("transformer/config.json", lambda d: d.update(n_heads="2"), "expected a positive integer"),
    ("transformer/config.json", lambda d: d.update(axes_dims=[8, 8, 8]), "axes_dims"),
    ("transformer/config.json", lambda d: d.update(axes_lens=[1536, 64, 64]), "axes_lens"),
    ("text_encoder/config.json", lambda d: d.update(model_type="llama"), "model_type"),
    ("text_encoder/config.json", lambda d: d.update(hidden_size=48), "cap_feat_dim"),
    ("text_encoder/config.json", lambda d: d.update(max_position_embeddings=256), "max_position_embeddings"),
    ("vae/config.json", lambda d: d.update(latent_channels=4), "latent_channels"),
    ("vae/config.json", lambda d: d.update(_class_name="AutoencoderTiny"), "AutoencoderTiny"),
    ("scheduler/scheduler_config.json", lambda d: d.update(_class_name="DDIMScheduler"), "DDIMScheduler"),
]


@pytest.mark.usefixtures("never_loaded")
@pytest.mark.parametrize(("file", "change", "message"), CONFIG_MISMATCHES, ids=[m for _, _, m in CONFIG_MISMATCHES])
def test_a_config_that_does_not_match_z_image_is_refused_naming_the_file(
    model: Path, file: str, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    _edit(model / file, change)
    error = refused(model)
    assert message in str(error)
    assert f"{file}:" in str(error) and file in error.missing


def _vocab_json_only(model: Path) -> None:
    """The older tokenizer layout: vocab.json + merges.txt instead of tokenizer.json."""
    folder = model / "tokenizer"
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    (folder / "vocab.json").write_text(json.dumps(tokenizer["model"]["vocab"]))
    merges = [" ".join(pair) for pair in tokenizer["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer.json").unlink()


def _in_tokenizer(model: Path, change: Callable[[dict[str, Any]], None]) -> None:
    _edit(model / "tokenizer" / "tokenizer.json", change)


def _in_tokenizer_config(model: Path, change: Callable[[dict[str, Any]], None]) -> None:
    _edit(model / "tokenizer" / "tokenizer_config.json", change)


VOCABULARY_MISMATCHES: list[tuple[str, Callable[[Path], None], str]] = [
    (
        "encoder vocab_size shrunk",
        lambda m: _edit(m / "text_encoder" / "config.json", lambda d: d.update(vocab_size=700)),
        "has 719 token ids",
    ),
    ("a token id past the end", lambda m: _in_tokenizer(m, lambda d: d["model"]["vocab"].update(zzqx=800)), "801"),
    (
        "an added token past the end",
        lambda m: _in_tokenizer(m, lambda d: d["added_tokens"].append({"id": 719, "content": "<x>"})),
        "has 720 token ids",
    ),
    (
        "a special token the vocabulary lacks",
        lambda m: _in_tokenizer_config(m, lambda d: d["extra_special_tokens"].append("<|new|>")),
        "has 720 token ids",
    ),
    (
        "vocab.json one token larger",
        lambda m: [_vocab_json_only(m), _edit(m / "tokenizer" / "vocab.json", lambda d: d.update(zzqx=719))],
        "has 720 token ids",
    ),
]


@pytest.mark.usefixtures("never_loaded")
@pytest.mark.parametrize(
    ("damage", "message"), [(d, m) for _, d, m in VOCABULARY_MISMATCHES], ids=[i for i, _, _ in VOCABULARY_MISMATCHES]
)
def test_a_tokenizer_larger_than_the_text_encoder_vocabulary_is_refused_before_loading(
    model: Path, damage: Callable[[Path], None], message: str
) -> None:
    damage(model)
    error = refused(model)
    text = str(error)
    assert message in text and "text_encoder/config.json" in text and "vocab_size is" in text
    assert error.missing in (("tokenizer/tokenizer.json",), ("tokenizer/vocab.json",))


def test_the_older_tokenizer_files_are_read_for_the_vocabulary_check(model: Path) -> None:
    from zimage_turbo import check_pipeline_dir

    _vocab_json_only(model)
    check_pipeline_dir(model)  # 719 ids, vocab_size 719
    _edit(model / "text_encoder" / "config.json", lambda d: d.update(vocab_size=718))
    with pytest.raises(IncompleteModelError, match=r"tokenizer/vocab\.json: the tokenizer has 719 token ids"):
        check_pipeline_dir(model)


def test_what_the_libraries_raise_while_loading_is_a_model_load_error(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The folder check cannot foresee every value a library rejects; whatever it raises (a TypeError from a
    # config value, transformers' own validation errors) is reported as the model failing to load.
    import torch
    from transformers import Qwen2Tokenizer

    from zimage_turbo import ModelLoadError, check_pipeline_dir
    from zimage_turbo.host import HostHomes
    from zimage_turbo.loader import load_pipeline

    def broken(*_: Any, **__: Any) -> Any:
        raise TypeError("'>' not supported between instances of 'int' and 'str'")

    monkeypatch.setattr(Qwen2Tokenizer, "from_pretrained", broken)
    with pytest.raises(ModelLoadError, match="TypeError: '>' not supported") as caught:
        load_pipeline(
            check_pipeline_dir(model), dtype=torch.float32, targets={}, homes=HostHomes(pin=False), progress=False
        )
    assert str(model) in str(caught.value) and isinstance(caught.value.__cause__, TypeError)


@pytest.mark.usefixtures("never_loaded")
def test_a_class_from_the_model_folder_is_never_imported(model: Path, tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    code = f"open({str(marker)!r}, 'w').close()\nclass EvilModel: pass\n"
    for folder in (model, model / "transformer"):
        (folder / "evil_module.py").write_text(code)
    _edit(model / "model_index.json", lambda d: d.update(transformer=["evil_module", "EvilModel"]))
    error = refused(model)
    assert "evil_module" in str(error) and "EvilModel" in str(error)
    assert not marker.exists() and "evil_module" not in sys.modules


class _Bomb:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.marker), "w"))


def test_only_safetensors_are_read_even_beside_pickles(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "unpickled"
    for name in ("transformer/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin"):
        (model / name).write_bytes(pickle.dumps({"weight": _Bomb(marker)}))
    (model / "text_encoder" / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Bomb(marker)}))

    import torch

    def no_torch_load(*_: Any, **__: Any) -> Any:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    opened: list[str] = []
    real_open = builtins.open

    def spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    gen = Generator(model=model, strategy="cpu", settings=ZImageSettings(progress=False))
    image = gen.generate(PROMPT, height=256, width=256, steps=2, seed=5).image
    monkeypatch.setattr(builtins, "open", real_open)
    assert not marker.exists()
    assert not [name for name in opened if name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    clean = Generator(model=_without_pickles(model, tmp_path), strategy="cpu", settings=ZImageSettings(progress=False))
    twin = clean.generate(PROMPT, height=256, width=256, steps=2, seed=5).image
    assert np.array_equal(np.asarray(image), np.asarray(twin))


def _without_pickles(model: Path, tmp_path: Path) -> Path:
    clean = tmp_path / "clean"
    shutil.copytree(model, clean, ignore=shutil.ignore_patterns("*.bin"))
    return clean


def test_no_source_file_enables_remote_code_or_unpickling() -> None:
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, path
            if isinstance(node, ast.Constant) and node.value == "trust_remote_code":
                raise AssertionError(f"{path}: trust_remote_code passed indirectly")
            if isinstance(node, ast.Attribute) and node.attr in ("load", "loads", "Unpickler"):
                owner = node.value
                assert not (isinstance(owner, ast.Name) and owner.id in ("pickle", "torch", "dill")), (
                    f"{path}:{node.lineno}: {owner.id}.{node.attr}"
                )
            if isinstance(node, ast.keyword) and node.arg == "use_safetensors":
                assert isinstance(node.value, ast.Constant) and node.value.value is True, path
    loader = (SRC / "loader.py").read_text(encoding="utf-8")
    # Weights are read by zimage_turbo.weights from safetensors files (headers checked, positional reads);
    # the libraries' own loaders only read the tokenizer, the scheduler's and the text encoder's configs.
    assert "read_safetensors_header" in loader
    assert set(re.findall(r"(\w+)\.from_pretrained\(", loader)) <= {
        "Qwen2Tokenizer",
        "FlowMatchEulerDiscreteScheduler",
        "Qwen3Config",
    }


# -- disk space before a download --------------------------------------------------------------------------


def test_bytes_to_fetch_counts_only_what_is_missing() -> None:
    files = [RemoteFile("a", 100), RemoteFile("b", 50), RemoteFile("c", 10)]
    assert bytes_to_fetch(files, {}) == 160
    assert bytes_to_fetch(files, {"a": 100, "b": 20}) == 40  # b partly there (a resumable partial copy)
    assert bytes_to_fetch(files, {"a": 500, "c": -3}) == 60  # never below zero, nor above the file
    assert bytes_to_fetch([], {"a": 1}) == 0


def test_check_disk_space_keeps_a_margin_and_says_how_much_is_needed(tmp_path: Path) -> None:
    margin = DISK_MARGIN_BYTES
    check_disk_space(10 * 10**9, 10 * 10**9 + margin, tmp_path)
    with pytest.raises(NotEnoughDiskSpaceError) as caught:
        check_disk_space(10 * 10**9, 10 * 10**9 + margin - 1, tmp_path, what="the model")
    error = caught.value
    assert (error.needed_bytes, error.free_bytes, error.folder) == (10 * 10**9, 10 * 10**9 + margin - 1, str(tmp_path))
    assert "10.00 GB still to fetch" in str(error) and "11.07 GB free" in str(error) and str(tmp_path) in str(error)
    assert "ZIMAGE_CACHE_DIR" in str(error)
    assert isinstance(error, zimage_turbo.DownloadError)


def _listing(checkpoint: Path) -> list[RemoteFile]:
    """What the hub would report for a repo holding ``checkpoint`` (LFS sha256 as the etag)."""
    return [
        RemoteFile(str(p.relative_to(checkpoint)), p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file()
    ]


@pytest.fixture
def offline_hubs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Hub clients replaced by a recorder: a test fails if a download starts when it should not."""
    calls: list[str] = []

    def client(hub: str) -> Callable[..., Path]:
        def download(repo_id: str, revision: str | None, cache: Path, local_only: bool) -> Path:
            if local_only:
                raise FileNotFoundError("not cached")
            calls.append(hub)
            raise ConnectionError("the test's hub is offline")

        return download

    for hub in ("huggingface", "modelscope"):
        monkeypatch.setitem(sources_module._HUB_LOOKUPS, hub, client(hub))
    return calls


def _unreachable(repo: str, revision: str | None) -> list[RemoteFile]:
    raise ConnectionError("no route to host")


def _free_space(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sources_module.shutil, "disk_usage", lambda _: usage(2**50, 2**50 - free, free))


@pytest.mark.usefixtures("hubs_resolve")
def test_a_download_that_does_not_fit_is_refused_before_any_byte(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_hubs: list[str]
) -> None:
    listing = _listing(tiny_checkpoint)
    monkeypatch.setitem(sources_module._REMOTE_FILES, "huggingface", lambda repo, revision: listing)
    # Only what the pipeline loads is fetched: the checkpoint's marker file (like a hub repo's README) is not.
    total = sum(f.size for f in listing if f.name != "zimage_turbo_checkpoint.json")
    _free_space(monkeypatch, total + DISK_MARGIN_BYTES - 1)
    with pytest.raises(NotEnoughDiskSpaceError) as caught:
        resolve_model(ZImageSettings(cache_dir=tmp_path / "cache"))
    assert caught.value.needed_bytes == total
    assert offline_hubs == []  # neither client started a download: not Hugging Face's, not ModelScope's


@pytest.mark.usefixtures("hubs_resolve")
def test_files_already_in_the_cache_are_not_counted(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_hubs: list[str]
) -> None:
    huggingface_cache(tiny_checkpoint, tmp_path / "cache" / "hub", REPO)
    listing = _listing(tiny_checkpoint)
    missing = next(f for f in listing if f.name == "transformer/diffusion_pytorch_model.safetensors")
    blobs = tmp_path / "cache" / "hub" / "models--Tongyi-MAI--Z-Image-Turbo" / "blobs"
    assert missing.etag is not None
    (blobs / missing.etag).unlink()  # an interrupted download: everything but this file arrived
    (blobs / f"{missing.etag}.0123abcd.incomplete").write_bytes(b"x" * 100)  # huggingface_hub restarts these
    monkeypatch.setitem(sources_module._REMOTE_FILES, "huggingface", lambda repo, revision: listing)
    monkeypatch.setitem(sources_module._REMOTE_FILES, "modelscope", _unreachable)
    _free_space(monkeypatch, missing.size + DISK_MARGIN_BYTES - 1)
    with pytest.raises(NotEnoughDiskSpaceError) as caught:
        resolve_model(ZImageSettings(cache_dir=tmp_path / "cache"))
    assert caught.value.needed_bytes == missing.size
    _free_space(monkeypatch, missing.size + DISK_MARGIN_BYTES)
    with pytest.raises(zimage_turbo.DownloadError, match="offline"):
        resolve_model(ZImageSettings(cache_dir=tmp_path / "cache"))
    assert offline_hubs == ["huggingface"]  # it fitted: the client was asked to download


def test_modelscope_partial_files_count_as_resumable(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = modelscope_cache(tiny_checkpoint, tmp_path / "ms", REPO, layout="snapshots")
    listing = _listing(tiny_checkpoint)
    vae = next(f for f in listing if f.name == "vae/diffusion_pytorch_model.safetensors")
    te = next(f for f in listing if f.name == "text_encoder/model.safetensors")
    (folder / vae.name).rename(folder / (vae.name + ".incomplete"))
    (folder / (vae.name + ".incomplete")).write_bytes(b"x" * 1000)  # ModelScope resumes from here
    (folder / te.name).write_bytes(b"x" * 10)  # a different file at the final path is fetched again
    present = sources_module._modelscope_present(listing, tmp_path / "ms", REPO)
    assert present[vae.name] == 1000 and present[te.name] == 0
    assert bytes_to_fetch(listing, present) == vae.size - 1000 + te.size


@pytest.mark.usefixtures("hubs_resolve")
def test_without_the_file_list_the_download_goes_ahead_and_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_hubs: list[str]
) -> None:
    def no_such_api(repo: str, revision: str | None) -> list[RemoteFile]:
        raise KeyError("Size")  # a mirror that lists files without sizes, say

    for hub in ("huggingface", "modelscope"):
        monkeypatch.setitem(sources_module._REMOTE_FILES, hub, no_such_api)
    with pytest.raises(zimage_turbo.DownloadError) as caught:
        resolve_model(ZImageSettings(cache_dir=tmp_path / "cache"))
    assert not isinstance(caught.value, NotEnoughDiskSpaceError)
    assert "Hugging Face: ConnectionError: the test's hub is offline" in str(caught.value)
    assert offline_hubs == ["huggingface", "modelscope"]  # the check was skipped, the clients tried


@pytest.mark.usefixtures("hubs_resolve")
def test_an_unreachable_hub_fails_once_not_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_hubs: list[str]
) -> None:
    # The clients list the same files first and would fail the same way (ModelScope after seconds of retries).
    for hub in ("huggingface", "modelscope"):
        monkeypatch.setitem(sources_module._REMOTE_FILES, hub, _unreachable)
    with pytest.raises(zimage_turbo.DownloadError) as caught:
        resolve_model(ZImageSettings(cache_dir=tmp_path / "cache"))
    assert not isinstance(caught.value, NotEnoughDiskSpaceError)
    message = str(caught.value)
    assert "Hugging Face: ConnectionError: no route to host" in message and "ModelScope: ConnectionError" in message
    assert offline_hubs == []
