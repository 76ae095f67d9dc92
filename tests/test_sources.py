"""Model resolution against real folders and caches laid out as the hub clients lay them out."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hub_caches import huggingface_cache, modelscope_cache
from zimage_turbo import (
    DownloadError,
    IncompleteModelError,
    ModelNotFoundError,
    ModelScopeNotInstalledError,
    ZImageSettings,
    resolve_model,
    sources,
)
from zimage_turbo.sources import huggingface_cache_dir, modelscope_cache_dir

REPO = "Tongyi-MAI/Z-Image-Turbo"


def test_local_folder(tiny_checkpoint: Path) -> None:
    resolved = resolve_model(ZImageSettings(model=str(tiny_checkpoint)))
    assert resolved.path == tiny_checkpoint
    assert resolved.source == "local"
    assert not resolved.downloaded


def test_local_source_with_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(ZImageSettings(model=str(tmp_path / "nowhere"), source="local"))


def test_not_a_folder_and_not_a_repo_id(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither an existing folder nor a repo id"):
        resolve_model(ZImageSettings(model=str(tmp_path / "a" / "b" / "c")))


def test_huggingface_cache_via_hf_home_set_after_import(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub was imported long ago (by diffusers); HF_HOME set now must still count, as it does in
    # the background articles' scripts.
    huggingface_cache(tiny_checkpoint, tmp_path / "hf-home" / "hub", REPO)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    resolved = resolve_model(ZImageSettings(offline=True))
    assert resolved.source == "huggingface"
    assert resolved.path.parent.parent.name == "models--Tongyi-MAI--Z-Image-Turbo"
    assert (resolved.path / "model_index.json").is_symlink()


def test_huggingface_cache_via_hf_hub_cache(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    huggingface_cache(tiny_checkpoint, tmp_path / "hub-cache", REPO)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert resolve_model(ZImageSettings(offline=True)).source == "huggingface"


def test_huggingface_cache_with_a_pinned_revision(tiny_checkpoint: Path, tmp_path: Path) -> None:
    snapshot = huggingface_cache(tiny_checkpoint, tmp_path / "root" / "hub", REPO, ref="v1.0")
    settings = ZImageSettings(cache_dir=tmp_path / "root", revision="v1.0", offline=True)
    assert resolve_model(settings).path == snapshot
    with pytest.raises(ModelNotFoundError):
        resolve_model(settings.replace(revision="v2.0"))


@pytest.mark.parametrize("layout", ["snapshots", "models", "flat"])
def test_modelscope_cache_layouts(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    folder = modelscope_cache(tiny_checkpoint, tmp_path / "ms", REPO, layout=layout)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    resolved = resolve_model(ZImageSettings(offline=True))
    assert resolved.source == "modelscope"
    assert resolved.path.resolve() == folder.resolve()


def test_background_article_setup_one_folder_for_both_hubs(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MODELSCOPE_CACHE=HF_HOME=<dir>, model downloaded with modelscope: found without any other setting.
    shared = tmp_path / "model_cache"
    modelscope_cache(tiny_checkpoint, shared, REPO, layout="flat")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(shared))
    monkeypatch.setenv("HF_HOME", str(shared))
    assert resolve_model(ZImageSettings(offline=True)).source == "modelscope"


def test_cache_dir_setting_covers_both_hubs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    settings = ZImageSettings(cache_dir=root, offline=True)
    assert huggingface_cache_dir(settings)[0] == root / "hub"
    assert modelscope_cache_dir(settings)[0] == root
    modelscope_cache(tiny_checkpoint, root, REPO, layout="snapshots")
    assert resolve_model(settings).source == "modelscope"


def test_huggingface_wins_when_both_caches_hold_the_model(tiny_checkpoint: Path, tmp_path: Path) -> None:
    huggingface_cache(tiny_checkpoint, tmp_path / "root" / "hub", REPO)
    modelscope_cache(tiny_checkpoint, tmp_path / "root", REPO, layout="snapshots")
    settings = ZImageSettings(cache_dir=tmp_path / "root", offline=True)
    assert resolve_model(settings).source == "huggingface"
    assert resolve_model(settings.replace(source="modelscope")).source == "modelscope"


def test_offline_and_not_cached_names_every_cache_and_the_fixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(ZImageSettings(offline=True))
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert str(tmp_path / "hf" / "hub") in message and "HF_HOME" in message
    assert str(tmp_path / "ms") in message and "MODELSCOPE_CACHE" in message
    assert "offline" in message and "ZIMAGE_CACHE_DIR" in message
    assert len(caught.value.searched) == 2
    assert isinstance(caught.value, FileNotFoundError)


def test_hf_hub_offline_variable_means_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="offline"):
        resolve_model(ZImageSettings(cache_dir=tmp_path))


def test_incomplete_cached_copy_offline_names_the_missing_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    snapshot = huggingface_cache(tiny_checkpoint, tmp_path / "root" / "hub", REPO)
    (snapshot / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(IncompleteModelError) as caught:
        resolve_model(ZImageSettings(cache_dir=tmp_path / "root", offline=True))
    assert caught.value.missing == ("vae/diffusion_pytorch_model.safetensors",)


def _delete_blob(snapshot: Path, name: str) -> tuple[Path, bytes]:
    """Delete the blob behind one file of a Hugging Face snapshot, leaving the snapshot's link dangling (what
    cleaning the cache's blobs by hand, or an interrupted `huggingface-cli delete-cache`, leaves)."""
    blob = (snapshot / name).resolve()
    data = blob.read_bytes()
    blob.unlink()
    return blob, data


def test_a_cached_snapshot_whose_blob_was_deleted_is_incomplete(tiny_checkpoint: Path, tmp_path: Path) -> None:
    snapshot = huggingface_cache(tiny_checkpoint, tmp_path / "root" / "hub", REPO)
    _delete_blob(snapshot, "vae/diffusion_pytorch_model.safetensors")
    with pytest.raises(IncompleteModelError) as caught:
        resolve_model(ZImageSettings(cache_dir=tmp_path / "root", source="huggingface", offline=True))
    assert caught.value.missing == ("vae/diffusion_pytorch_model.safetensors",)
    assert "broken link" in str(caught.value)


@pytest.mark.usefixtures("hubs_resolve")
def test_a_cached_snapshot_whose_blob_was_deleted_is_downloaded_again(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = huggingface_cache(tiny_checkpoint, tmp_path / "root" / "hub", REPO)
    blob, data = _delete_blob(snapshot, "transformer/diffusion_pytorch_model.safetensors")
    cached = sources._HUB_LOOKUPS["huggingface"]
    downloads: list[str] = []

    def client(repo_id: str, revision: str | None, cache: Path, local_only: bool) -> Path:
        if not local_only:  # what huggingface_hub does for a link whose blob is gone: fetch the blob again
            downloads.append(repo_id)
            blob.write_bytes(data)
        return cached(repo_id, revision, cache, True)

    monkeypatch.setitem(sources._HUB_LOOKUPS, "huggingface", client)
    monkeypatch.setitem(sources._REMOTE_FILES, "huggingface", lambda repo, revision: [])
    resolved = resolve_model(ZImageSettings(cache_dir=tmp_path / "root", source="huggingface"))
    assert downloads == [REPO]
    assert resolved.downloaded and resolved.path == snapshot


def test_incomplete_local_folder(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "transformer" / "config.json").unlink()
    with pytest.raises(IncompleteModelError, match=r"transformer/config\.json"):
        resolve_model(ZImageSettings(model=str(copy)))


def test_download_failure_is_clear_and_fast(tmp_path: Path) -> None:
    """The network path for real: both hubs' clients against an address that refuses connections."""
    script = textwrap.dedent(
        f"""
        from zimage_turbo import DownloadError, ZImageSettings, resolve_model
        try:
            resolve_model(ZImageSettings(cache_dir={str(tmp_path / "cache")!r}))
        except DownloadError as exc:
            print("DOWNLOAD-ERROR", exc)
        """
    )
    env = {k: v for k, v in os.environ.items()}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", MODELSCOPE_ENDPOINT="http://127.0.0.1:9")
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "DOWNLOAD-ERROR" in run.stdout, run.stdout + run.stderr
    assert time.monotonic() - started < 60
    assert "Hugging Face:" in run.stdout and "ModelScope:" in run.stdout
    assert "Connection refused" in run.stdout or "connect" in run.stdout.lower()
    # Nothing that looks like a model was left behind.
    leftovers = list((tmp_path / "cache").rglob("*.safetensors")) if (tmp_path / "cache").exists() else []
    assert leftovers == []


def test_download_error_is_a_model_source_error() -> None:
    from zimage_turbo import ModelSourceError

    assert issubclass(DownloadError, ModelSourceError)


def test_a_resolved_model_knows_its_name_and_revision(tiny_checkpoint: Path, tmp_path: Path) -> None:
    snapshot = huggingface_cache(tiny_checkpoint, tmp_path / "root" / "hub", REPO, ref="v1.0")
    settings = ZImageSettings(cache_dir=tmp_path / "root", revision="v1.0", offline=True)
    resolved = resolve_model(settings)
    assert (resolved.name, resolved.revision) == (REPO, snapshot.name)  # the commit, not the tag
    local = resolve_model(ZImageSettings(model=str(tiny_checkpoint)))
    assert (local.name, local.revision) == (tiny_checkpoint.name, None)  # the folder's name, not its path


def test_modelscope_without_its_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "modelscope", None)  # `import modelscope` raises ImportError
    with pytest.raises(ModelScopeNotInstalledError, match=r"zimage-turbo\[modelscope\]") as caught:
        resolve_model(ZImageSettings(model=REPO, source="modelscope", offline=True))
    assert isinstance(caught.value, ImportError) and caught.value.extra == "modelscope"
    # "auto" searches Hugging Face only, and says why ModelScope was left out.
    with pytest.raises(ModelNotFoundError, match=r"ModelScope: not tried.*zimage-turbo\[modelscope\]") as missing:
        resolve_model(ZImageSettings(model=REPO, offline=True, cache_dir=tmp_path / "empty"))
    assert len(missing.value.searched) == 2


def _no_name_service(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Name lookups fail as on a machine without a network; returns the hosts asked for."""
    import socket

    asked: list[str] = []

    def fail(host: str, *args: object, **kwargs: object) -> object:
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return asked


def test_a_hub_whose_name_does_not_resolve_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a name service the clients would retry (ModelScope's for about 20 s) before failing the same way."""
    from zimage_turbo.hub_reach import unreachable

    asked = _no_name_service(monkeypatch)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"Hugging Face: cannot resolve huggingface\.co") as caught:
        resolve_model(ZImageSettings(cache_dir=tmp_path / "cache"))
    assert time.monotonic() - started < 5 and "huggingface.co" in asked
    assert "no network" in str(caught.value)
    # a proxy resolves names itself: then the client is asked, as before
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert unreachable("huggingface") == ""


def test_the_host_checked_is_the_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    from zimage_turbo.hub_reach import hub_host, unreachable

    asked = _no_name_service(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080/")
    monkeypatch.delenv("MODELSCOPE_ENDPOINT", raising=False)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "www.example.cn")  # older clients' variable: a bare host
    assert (hub_host("huggingface"), hub_host("modelscope")) == ("mirror.example", "www.example.cn")
    assert "cannot resolve mirror.example" in unreachable("huggingface")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "https://hub.example.org")  # wins over MODELSCOPE_DOMAIN
    assert hub_host("modelscope") == "hub.example.org" and "hub.example.org" in unreachable("modelscope")
    assert asked == ["mirror.example", "hub.example.org"]
