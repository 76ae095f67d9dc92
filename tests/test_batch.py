"""Batches on the tiny checkpoint: the prompt file, the manifest, and resuming after an interruption (a hook
that stops the run, a killed process, the debris of a crash) with every image made exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from filelock import FileLock, Timeout
from PIL import Image

import zimage_turbo
import zimage_turbo.tasks as tasks_module
from zimage_turbo import (
    BatchConflictError,
    BatchLockedError,
    Generator,
    GeneratorPool,
    InvalidRequestError,
    ZImageError,
    ZImageSettings,
)
from zimage_turbo.batch import (
    MANIFEST_NAME,
    BatchItem,
    Manifest,
    derive_seed,
    items_from,
    manifest_row,
    read_prompts,
    run_batch,
    write_image,
)
from zimage_turbo.batch_lock import HOLDER_NAME, LOCK_NAME, lock_folder
from zimage_turbo.cli import main
from zimage_turbo.result import GenerationResult, Timings

SMALL = {"width": 256, "height": 256, "steps": 2}


class Stop(Exception):
    """Raised by a hook to interrupt a batch half-way."""


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def prompts_file(folder: Path, count: int = 6) -> Path:
    lines: list[Any] = [{"prompt": f"a small watercolor of thing number {i}"} for i in range(count)]
    lines[1] = {"prompt": "a lighthouse at dusk", "id": "lighthouse", "seed": 7}
    lines[2] = {"prompt": "a wide red fox", "width": 320}
    return write_lines(folder / "prompts.jsonl", lines)


def manifest_lines(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / MANIFEST_NAME).read_text().splitlines()]


def contents(folder: Path) -> dict[str, bytes]:
    """What a folder holds, but for the batch lock's files (a run leaves its lock file behind, unlocked)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".zimage-batch.")}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def assert_complete_and_equal(out: Path, reference: Path, items: list[BatchItem]) -> None:
    """Every item exactly once in the manifest and on disk, each image equal to the reference run's."""
    rows = manifest_lines(out)
    assert sorted(r["id"] for r in rows) == sorted(item.id for item in items)  # exactly once each
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == sorted(item.file for item in items)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".part")]
    for item in items:
        assert np.array_equal(pixels(out / item.file), pixels(reference / item.file)), item.id


@pytest.fixture(scope="module")
def settings(tiny_checkpoint: Path) -> ZImageSettings:
    return ZImageSettings(model=str(tiny_checkpoint), progress=False)


@pytest.fixture(scope="module")
def pool(settings: ZImageSettings) -> Iterator[GeneratorPool]:
    with GeneratorPool(settings=settings, devices=["cpu", "cpu"]) as shared:
        yield shared


@pytest.fixture(scope="module")
def straight(pool: GeneratorPool, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[BatchItem]]:
    """An uninterrupted run of prompts_file(): the reference for the interrupted ones."""
    folder = tmp_path_factory.mktemp("straight")
    source = prompts_file(folder)
    items = read_prompts(source, **SMALL)
    report = run_batch(source, folder / "out", pool=pool, **SMALL)
    assert (report.total, report.generated, report.skipped, report.failed) == (6, 6, 0, ())
    return folder / "out", items


# -- the prompt file ----------------------------------------------------------------------------------------------


def test_lines_get_ids_seeds_and_defaults(tmp_path: Path) -> None:
    source = prompts_file(tmp_path)
    with source.open("a") as stream:
        stream.write("\n   \n")  # blank lines are skipped
    items = read_prompts(source, seed=3, **SMALL)
    assert [i.id for i in items] == ["000001", "lighthouse", "000003", "000004", "000005", "000006"]
    assert [i.line for i in items] == [1, 2, 3, 4, 5, 6]
    assert items[1].seed == 7 and items[0].seed == derive_seed(3, "000001")
    assert (items[2].width, items[2].height, items[2].steps) == (320, 256, 2)
    assert items[0].file == "000001.png"
    # the same line gives the same seed whatever the base seed's other lines are; another base, another seed
    assert read_prompts(source, seed=3, **SMALL) == items
    assert read_prompts(source, seed=4, **SMALL)[0].seed != items[0].seed
    assert len({i.seed for i in items}) == len(items)


def test_derived_seeds_never_change() -> None:
    # Resuming relies on this: a different derivation would silently give a half-old, half-new batch.
    assert derive_seed(0, "000001") == 1418002970964095728
    assert derive_seed(7, "fox") == 4828788522129564890


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"prompts.jsonl:2: not valid JSON"),
        ('"a fox"', r"prompts.jsonl:2: expected an object"),
        ('{"text": "a fox"}', r"prompts.jsonl:2: unknown field\(s\) text"),
        ('{"seed": 1}', r"prompts.jsonl:2: no prompt"),
        ('{"prompt": "a fox", "width": 1000}', r"prompts.jsonl:2: width must be a multiple of 16"),
        ('{"prompt": "a fox", "seed": -1}', r"prompts.jsonl:2: seed must be between"),
        ('{"prompt": "a fox", "seed": null}', r"prompts.jsonl:2: seed must be an integer, got NoneType"),
        ('{"prompt": "a fox", "steps": "8"}', r"prompts.jsonl:2: steps must be an integer"),
        ('{"prompt": "  "}', r"prompts.jsonl:2: prompt is empty"),
        ('{"prompt": "a fox", "id": "../fox"}', r"prompts.jsonl:2: id must be"),
        ('{"prompt": "a fox", "id": "000001"}', r"prompts.jsonl:2: id '000001' is also used at line 1"),
    ],
)
def test_bad_lines_are_refused_with_their_line_number(tmp_path: Path, line: str, message: str) -> None:
    source = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "a cat"}, line])
    with pytest.raises(InvalidRequestError, match=message):
        read_prompts(source)


def test_prompts_in_memory(tmp_path: Path) -> None:
    items = items_from(["a cat", {"prompt": "a dog", "id": "dog"}], seed=1)
    assert [(i.id, i.prompt) for i in items] == [("000001", "a cat"), ("dog", "a dog")]
    in_file = write_lines(tmp_path / "p.jsonl", [{"prompt": "a cat"}, {"prompt": "a dog", "id": "dog"}])
    assert items == read_prompts(in_file, seed=1)
    with pytest.raises(InvalidRequestError, match=r"missing\.jsonl"):
        read_prompts(tmp_path / "missing.jsonl")


def test_ids_that_differ_only_in_case_are_refused() -> None:
    # Fox.png and fox.png are one file on macOS and Windows (and on shares they export): one image would
    # silently replace the other while the manifest listed both.
    with pytest.raises(InvalidRequestError, match=r"prompt 2: id 'fox' .*'Fox' at prompt 1"):
        items_from([{"prompt": "a fox", "id": "Fox"}, {"prompt": "a fox", "id": "fox"}])


class NoImages:
    """A pool that fails the test if the batch starts an image: refusals must come before any work."""

    devices = ("none",)
    settings = ZImageSettings(progress=False)

    def generate_requests(self, requests: Any) -> Any:
        raise AssertionError("an image was started")

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([BatchItem("dup", "a cat", 1), BatchItem("dup", "a dog", 2)], r"item 2 \(id 'dup'\): .*also used at item 1"),
        ([BatchItem("../escaped", "a cat", 1)], r"item 1 \(id '../escaped'\): id must be"),
        ([BatchItem("a/b", "a cat", 1)], r"id must be .*'a/b'"),
        ([BatchItem("..", "a cat", 1)], r"id must be .*'\.\.'"),
        ([BatchItem(".hidden", "a cat", 1)], r"id must be .*'\.hidden'"),
        ([BatchItem("", "a cat", 1)], r"id must be .*''"),
        ([BatchItem("a\x00b", "a cat", 1)], r"id must be .*'a\\x00b'"),
        ([BatchItem("x" * 129, "a cat", 1)], r"id must be 1 to 128"),
        ([BatchItem(7, "a cat", 1)], r"id must be .* got 7"),  # type: ignore[arg-type]
        ([BatchItem("fox", "a cat", None)], r"item 1 \(id 'fox'\): seed must be an integer"),  # type: ignore[arg-type]
        ([BatchItem("fox", "a cat", 1, width=1000)], r"item 1 \(id 'fox'\): width must be a multiple of 16"),
        ([BatchItem("fox", " ", 1)], r"item 1 \(id 'fox'\): prompt is empty"),
    ],
)
def test_ready_made_items_are_checked_like_lines(tmp_path: Path, items: list[BatchItem], message: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(InvalidRequestError, match=message):
        run_batch(items, out, pool=NoImages())  # type: ignore[arg-type]
    # Refused before anything was written: no folder, nothing beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_image_is_never_written_outside_the_folder(tmp_path: Path) -> None:
    # The last guard, for items that reach write_image without load_items (a Ray actor gets them as JSON).
    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidRequestError, match=r"'\.\./escaped'"):
        write_image(tmp_path / "out", BatchItem("../escaped", "a cat", 1), None)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out"]


def test_a_tilde_means_the_home_folder(tmp_path: Path, capsys: Any) -> None:
    from zimage_turbo.ray_batch import run_batch_ray

    # conftest points HOME at tmp_path / "home" and makes tmp_path the working folder, where a literal "~"
    # folder would appear. The shell leaves ~ alone in quotes and in --out=~/d.
    home = tmp_path / "home"
    home.mkdir()
    write_lines(home / "prompts.jsonl", [{"prompt": "a cat", "id": "cat"}])
    assert [i.id for i in read_prompts("~/prompts.jsonl")] == ["cat"]
    assert run_batch([], "~/library").total == 0
    assert run_batch_ray([], "~/ray").total == 0
    assert main(["batch", "~/prompts.jsonl", "--out=~/cli", "--model", "/nonexistent/model", "-q"]) == 1
    assert "ModelNotFoundError" in capsys.readouterr().err  # it got as far as loading: the paths were found
    assert (home / "library").is_dir() and (home / "ray").is_dir() and (home / "cli").is_dir()
    assert not (tmp_path / "~").exists()


# -- a straight run -----------------------------------------------------------------------------------------------


def test_a_run_writes_each_image_and_its_manifest_line(
    straight: tuple[Path, list[BatchItem]], settings: ZImageSettings
) -> None:
    out, items = straight
    rows = manifest_lines(out)
    assert len(rows) == 6
    by_id = {r["id"]: r for r in rows}
    fox = by_id["000003"]
    assert (fox["prompt"], fox["file"], fox["width"], fox["height"], fox["steps"]) == (
        "a wide red fox",
        "000003.png",
        320,
        256,
        2,
    )
    assert fox["strategy"] == "cpu" and fox["timings"]["denoise"] > 0 and fox["line"] == 3
    assert Image.open(out / "000003.png").size == (320, 256)
    assert by_id["lighthouse"]["seed"] == 7
    # Each image is the one a single Generator makes for that line.
    with Generator(settings=settings) as gen:
        for item in items[:3]:
            alone = gen.generate(item.prompt, width=item.width, height=item.height, steps=item.steps, seed=item.seed)
            assert np.array_equal(np.asarray(alone.image), pixels(out / item.file))
    # Running again does nothing.
    again = run_batch(out.parent / "prompts.jsonl", out, settings=settings, devices=["cpu"], **SMALL)
    assert (again.generated, again.skipped) == (0, 6) and len(manifest_lines(out)) == 6


# -- interrupted, then resumed ------------------------------------------------------------------------------------


def test_interrupted_half_way_then_resumed(
    straight: tuple[Path, list[BatchItem]], pool: GeneratorPool, tmp_path: Path
) -> None:
    reference, items = straight
    source = prompts_file(tmp_path)
    out = tmp_path / "out"
    seen: list[str] = []

    def stop_after_three(row: dict[str, Any]) -> None:
        seen.append(row["id"])
        if len(seen) == 3:
            raise Stop

    with pytest.raises(Stop):
        run_batch(source, out, pool=pool, on_row=stop_after_three, **SMALL)
    assert len(manifest_lines(out)) == 3
    resumed = run_batch(source, out, pool=pool, **SMALL)
    assert (resumed.skipped, resumed.generated, resumed.complete) == (3, 3, True)
    assert_complete_and_equal(out, reference, items)
    assert not {r["id"] for r in manifest_lines(out)[3:]} & set(seen)  # the first three were not made again


def test_resume_cleans_what_a_crash_leaves(
    straight: tuple[Path, list[BatchItem]], pool: GeneratorPool, tmp_path: Path
) -> None:
    reference, items = straight
    source = prompts_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    rows = manifest_lines(reference)
    by_id = {r["id"]: r for r in rows}
    for name in ("000001.png", "lighthouse.png", "000004.png", "000005.png"):
        (out / name).write_bytes((reference / name).read_bytes())
    stale = {**by_id["000005"], "prompt": "what line 5 said before the file was edited"}  # its image is there
    lines = [
        json.dumps(by_id["000001"]),
        json.dumps(by_id["000001"]),  # listed twice
        json.dumps(by_id["000003"]),  # its image is gone
        json.dumps(stale),  # another prompt under the same id: made again
        json.dumps(by_id["lighthouse"]),
        "{\x00 garbage",  # unreadable
        json.dumps(by_id["000006"])[:40],  # half-written when the process died
    ]
    (out / MANIFEST_NAME).write_text("\n".join(lines))
    (out / ".000006.png.0badc0de.part").write_bytes(b"\x89PNG half")  # a temporary file of a killed writer
    # 000004.png exists without a manifest line (killed between the two writes): made again, listed once.
    assert Manifest(out).rows()[-1]["id"] == "lighthouse"
    # 000005.png was made from another prompt: not replaced without overwrite, and nothing is touched.
    before = contents(out)
    with pytest.raises(BatchConflictError, match=r"000005 \(prompt\)") as refused:
        run_batch(source, out, pool=NoImages(), **SMALL)  # type: ignore[arg-type]
    assert refused.value.ids == ("000005",)
    assert contents(out) == before
    report = run_batch(source, out, pool=pool, overwrite=True, **SMALL)
    assert (report.skipped, report.generated) == (2, 4)  # 000001 and lighthouse were done
    assert_complete_and_equal(out, reference, items)
    assert (out / MANIFEST_NAME).read_text().endswith("\n")


def copy_of(reference: Path, out: Path) -> Path:
    """The images and manifest of a finished run (not its lock files)."""
    out.mkdir()
    for path in reference.iterdir():
        if not path.name.startswith(".zimage-batch."):
            (out / path.name).write_bytes(path.read_bytes())
    return out


def test_images_made_with_other_parameters_are_replaced_only_with_overwrite(
    straight: tuple[Path, list[BatchItem]], pool: GeneratorPool, tmp_path: Path
) -> None:
    # Like generate, which needs --overwrite: a rerun with another default size must not silently replace
    # what the folder holds.
    reference, _ = straight
    source = prompts_file(tmp_path)
    out = copy_of(reference, tmp_path / "out")
    before = contents(out)
    wider = {**SMALL, "width": 320}  # changes every line without its own width: all but 000003
    with pytest.raises(BatchConflictError) as refused:
        run_batch(source, out, pool=NoImages(), **wider)  # type: ignore[arg-type]
    assert refused.value.ids == ("000001", "lighthouse", "000004", "000005", "000006")
    assert refused.value.folder == str(out)
    message = str(refused.value)
    assert "5 image(s)" in message and "000001 (width 256 -> 320)" in message and "and 2 more" in message
    assert "overwrite" in message and "another output folder" in message
    assert contents(out) == before  # nothing written
    # With overwrite the five are made again at the new size, listed once each; 000003 is kept.
    report = run_batch(source, out, pool=pool, overwrite=True, **wider)
    assert (report.skipped, report.generated) == (1, 5)
    items = read_prompts(source, **wider)
    rows = manifest_lines(out)
    assert sorted(r["id"] for r in rows) == sorted(item.id for item in items)
    assert all((r["width"], r["height"]) == (320, 256) for r in rows)
    assert (out / "000003.png").read_bytes() == before["000003.png"]
    [(_, alone)] = list(pool.generate_requests([items[0].request()]))
    assert np.array_equal(np.asarray(alone.image), pixels(out / "000001.png"))
    # The new parameters are now the folder's: the same run again is done, the old one would conflict.
    assert run_batch(source, out, pool=NoImages(), **wider).skipped == 6  # type: ignore[arg-type]
    with pytest.raises(BatchConflictError):
        run_batch(source, out, pool=NoImages(), **SMALL)  # type: ignore[arg-type]


def test_a_downscaled_image_counts_as_done(tmp_path: Path) -> None:
    # allow_downscale can make an image smaller than its line asks; resuming must recognise it as that line's
    # image, not call it a conflict (or make it again) on every run.
    item = items_from([{"prompt": "a wide red fox", "id": "fox", "width": 320, "height": 256}], steps=2)[0]
    smaller = GenerationResult(
        (Image.new("RGB", (256, 192)),), item.prompt, (item.seed,), 256, 192, 2, 0.0, "cpu", "cpu", "float32", Timings()
    )
    out = tmp_path / "out"
    out.mkdir()
    write_image(out, item, smaller)
    Manifest(out).append(manifest_row(item, smaller))
    report = run_batch([item], out, pool=NoImages())  # type: ignore[arg-type]
    assert (report.skipped, report.generated) == (1, 0)
    [row] = manifest_lines(out)
    assert (row["width"], row["height"], row["requested"]) == (256, 192, {"width": 320, "height": 256})


def test_cli_batch_refuses_to_replace_without_overwrite(
    straight: tuple[Path, list[BatchItem]], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, _ = straight
    source = prompts_file(tmp_path)
    out = copy_of(reference, tmp_path / "out")
    command = ["batch", str(source), "--out", str(out), "--size", "320x256", "--steps", "2", "-q"]
    assert main([*command, "--model", "/nonexistent/model"]) == 2  # refused before loading
    error = capsys.readouterr().err
    assert "000001 (width 256 -> 320)" in error and "--overwrite" in error
    # --overwrite reaches run_batch (the run itself is tested above).
    seen: dict[str, Any] = {}

    def spy(items: Any, out_dir: Any, **options: Any) -> Any:
        seen.update(options)
        raise Stop

    monkeypatch.setattr("zimage_turbo.batch.run_batch", spy)
    with pytest.raises(Stop):
        main([*command, "--overwrite"])
    assert seen["overwrite"] is True


# A process that holds a folder's batch lock until its stdin closes. It imports only the lock's two modules:
# importing the package (torch) would take seconds.
HOLD = """
import sys, types
from pathlib import Path
package = types.ModuleType("zimage_turbo")
package.__path__ = [sys.argv[1]]
sys.modules["zimage_turbo"] = package
from zimage_turbo.batch_lock import lock_folder
with lock_folder(Path(sys.argv[2])):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def held_by_another_process(folder: Path) -> Iterator[subprocess.Popen[str]]:
    source = Path(zimage_turbo.__file__).parent
    command = [sys.executable, "-c", HOLD, str(source), str(folder)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "held\n"
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_second_run_on_the_folder_is_refused_or_waits(
    straight: tuple[Path, list[BatchItem]], tmp_path: Path, capsys: Any
) -> None:
    reference, _ = straight
    source = prompts_file(tmp_path)
    out = copy_of(reference, tmp_path / "out")
    before = contents(out)
    command = ["batch", str(source), "--out", str(out), "--size", "256x256", "--steps", "2", "-q"]
    command += ["--model", "/nonexistent/model"]  # every image is done: a run that goes ahead loads nothing
    host = socket.gethostname()
    with held_by_another_process(out) as holder:
        with pytest.raises(BatchLockedError) as refused:
            run_batch(source, out, pool=NoImages(), **SMALL)  # type: ignore[arg-type]
        assert (refused.value.folder, refused.value.pid, refused.value.host) == (str(out), holder.pid, host)
        assert f"{out} is in use by another batch run (pid {holder.pid} on {host}, since " in str(refused.value)
        started = time.monotonic()
        with pytest.raises(BatchLockedError):
            run_batch(source, out, pool=NoImages(), wait=0.3, **SMALL)  # type: ignore[arg-type]
        assert time.monotonic() - started >= 0.3
        assert main(command) == 2
        assert f"in use by another batch run (pid {holder.pid} on {host}" in capsys.readouterr().err
        # --wait: the holder lets go half a second later, then this run goes ahead.
        assert holder.stdin is not None
        threading.Timer(0.5, holder.stdin.close).start()
        assert main([*command, "--wait"]) == 0
        printed = capsys.readouterr()
        assert f"(pid {holder.pid} on {host}" in printed.err and "waiting for it to finish" in printed.err
        assert "0 generated, 6 already done" in printed.out
        assert holder.wait(timeout=30) == 0
    assert contents(out) == before
    assert not (out / HOLDER_NAME).exists()


def test_the_lock_is_released_however_the_run_ends(tmp_path: Path) -> None:
    out = tmp_path / "out"
    items = [BatchItem("cat", "a cat", 1, 256, 256, 2)]

    def free() -> bool:
        probe = FileLock(out / LOCK_NAME)  # a FileLock object of its own: filelock keeps it apart from others
        try:
            probe.acquire(timeout=0)
        except Timeout:
            return False
        probe.release()
        return True

    class Broken(NoImages):
        seen: ClassVar[dict[str, Any]] = {}

        def __init__(self, error: BaseException) -> None:
            self.error = error

        def generate_requests(self, requests: Any) -> Any:
            self.seen["held"] = not free()
            self.seen["holder"] = json.loads((out / HOLDER_NAME).read_text())
            raise self.error

    for error in (KeyboardInterrupt(), RuntimeError("a GPU fell off")):
        with pytest.raises(type(error)):
            run_batch(items, out, pool=Broken(error))  # type: ignore[arg-type]
        assert Broken.seen["held"] and Broken.seen["holder"]["pid"] == os.getpid()
        assert free() and not (out / HOLDER_NAME).exists()
    # Two runs in one process exclude each other too.
    with lock_folder(out):
        assert not free()
        with pytest.raises(BatchLockedError, match=rf"pid {os.getpid()} on "):
            run_batch(items, out, pool=NoImages())  # type: ignore[arg-type]
    assert free()
    with pytest.raises(InvalidRequestError, match=r"wait must be True, False or a number of seconds >= 0, got -1"):
        run_batch(items, tmp_path / "never", wait=-1, pool=NoImages())  # type: ignore[arg-type]
    assert not (tmp_path / "never").exists()


def test_a_damaged_image_listed_as_done_is_made_again(
    straight: tuple[Path, list[BatchItem]], pool: GeneratorPool, tmp_path: Path
) -> None:
    # A manifest line says "done", but its file is not that image any more (a disk that filled up, a copy
    # that stopped, a file replaced by hand): the line must not be trusted.
    reference, items = straight
    source = prompts_file(tmp_path)
    out = copy_of(reference, tmp_path / "out")
    whole = (reference / "000001.png").read_bytes()
    (out / "000001.png").write_bytes(whole[: len(whole) // 2])  # truncated
    (out / "lighthouse.png").write_bytes(b"")  # empty
    Image.new("RGB", (256, 256)).save(out / "000003.png")  # a valid PNG, but 000003 is 320x256
    report = run_batch(source, out, pool=pool, **SMALL)
    assert (report.skipped, report.generated) == (3, 3)
    assert_complete_and_equal(out, reference, items)  # each id listed once, each image the right one


def test_a_failing_line_is_reported_and_made_by_the_next_run(
    straight: tuple[Path, list[BatchItem]], pool: GeneratorPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, items = straight
    source = prompts_file(tmp_path)
    out = tmp_path / "out"
    real_encode = tasks_module.encode

    def encode(pipe: Any, prompt: str, *args: Any) -> Any:
        if prompt == "a lighthouse at dusk":
            raise RuntimeError("something broke on this prompt")
        return real_encode(pipe, prompt, *args)

    monkeypatch.setattr(tasks_module, "encode", encode)
    report = run_batch(source, out, pool=pool, **SMALL)
    assert report.failed == (("lighthouse", "RuntimeError: something broke on this prompt"),)
    assert report.generated == 5 and not report.complete and "failed lighthouse" in report.describe()
    assert not (out / "lighthouse.png").exists() and "lighthouse" not in {r["id"] for r in manifest_lines(out)}
    monkeypatch.setattr(tasks_module, "encode", real_encode)
    assert run_batch(source, out, pool=pool, **SMALL).generated == 1
    assert_complete_and_equal(out, reference, items)


# -- the command line, and a process killed with SIGKILL ----------------------------------------------------------


def test_cli_batch(straight: tuple[Path, list[BatchItem]], tiny_checkpoint: Path, tmp_path: Path, capsys: Any) -> None:
    reference, items = straight
    source = prompts_file(tmp_path)
    common = ["batch", str(source), "--out", str(tmp_path / "out"), "--size", "256x256", "--steps", "2"]
    status = main([*common, "--model", str(tiny_checkpoint), "--devices", "cpu,cpu", "--quiet"])
    assert status == 0 and "6 generated, 0 already done, 0 failed" in capsys.readouterr().out
    assert_complete_and_equal(tmp_path / "out", reference, items)
    assert main([*common, "--model", str(tiny_checkpoint), "--quiet"]) == 0
    assert "0 generated, 6 already done" in capsys.readouterr().out
    assert main([*common, "--ray", "local", "--devices", "cpu", "--quiet"]) == 2
    assert "--devices is for local runs" in capsys.readouterr().err
    write_lines(source, [{"prompt": "a cat"}, {"prompt": "a dog", "width": 100}])
    assert main([*common, "--quiet"]) == 2  # checked before any loading
    assert "prompts.jsonl:2: width" in capsys.readouterr().err


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_a_killed_process_resumes_to_the_same_images(
    straight: tuple[Path, list[BatchItem]], pool: GeneratorPool, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # Larger images than the reference run, and more of them than the kill waits for, so that the process is
    # still working when it is killed even if this test is starved of CPU for a while (a loaded machine).
    count = 12
    lines = [{"prompt": f"a small watercolor of thing number {i}", "width": 384, "height": 384} for i in range(count)]
    source = write_lines(tmp_path / "prompts.jsonl", lines)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "zimage_turbo", "batch", str(source), "--out", str(out), "--steps", "3"]
    command += ["--model", str(tiny_checkpoint), "--devices", "cpu", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            manifest = out / MANIFEST_NAME
            if manifest.is_file() and manifest.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    killed_at = len(manifest_lines(out))
    assert 2 <= killed_at < count
    resumed = run_batch(source, out, pool=pool, steps=3)
    assert (resumed.skipped, resumed.generated) == (killed_at, count - killed_at)
    # The same batch run straight through, for comparison.
    whole = tmp_path / "whole"
    run_batch(source, whole, pool=pool, steps=3)
    assert_complete_and_equal(out, whole, read_prompts(source, steps=3))


def test_ray_is_needed_only_when_there_is_work(
    straight: tuple[Path, list[BatchItem]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zimage_turbo.ray_batch import run_batch_ray

    out, _ = straight
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    report = run_batch_ray(out.parent / "prompts.jsonl", out, **SMALL)
    assert (report.skipped, report.generated) == (6, 0)
    with pytest.raises(ZImageError, match=r"pip install \"zimage-turbo\[ray\]\""):
        run_batch_ray(["a cat"], tmp_path / "new", **SMALL)
