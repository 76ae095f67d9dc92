"""The benchmark harness's bookkeeping: which cases it infers instead of running, the summary and targets, the
JSON of a real run on the tiny checkpoint (on the CPU), resuming, and the generated markdown. No timing is
asserted: timings belong to the GPU run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from zimage_turbo.bench.cases import Case, decide, forced_case, summarize
from zimage_turbo.bench.report import BEGIN, END, _label, markdown, write_markdown
from zimage_turbo.bench.runner import EXIT_INCOMPLETE, main


def _row(kind: str, mode: str, budget: float | None, **fields: Any) -> dict[str, Any]:
    row = {"key": Case(kind, mode, budget).key, "kind": kind, "mode": mode, "budget_gib": budget, "status": "ok"}  # type: ignore[arg-type]
    row.update(fields)
    return row


def test_auto_and_sweeps_always_run() -> None:
    rows = [_row("ours", "auto", None, s_per_image=1.0, peak_reserved_gib={"cuda:0": 1.0})]
    assert decide(Case("ours", "auto", 16), rows) is None
    assert decide(Case("sweep", "auto", 12), rows) is None


def test_a_strategy_auto_chose_is_not_run_twice() -> None:
    auto = _row("ours", "auto", 16, strategy="hybrid", s_per_image=1.4, fallbacks=[])
    row = decide(Case("ours", "hybrid", 16), [auto])
    assert row is not None and row["inferred_from"] == auto["key"] and row["s_per_image"] == 1.4
    assert row["key"] == "ours:hybrid@16" and row["mode"] == "hybrid"
    # ...but not when auto got there through a fallback, or chose something else
    fell = _row("ours", "auto", 16, strategy="hybrid", fallbacks=["strategy: full_gpu failed"])
    assert decide(Case("ours", "hybrid", 16), [fell]) is None
    assert decide(Case("ours", "streamed", 16), [auto]) is None


def test_a_cap_above_the_reserved_peak_of_a_larger_budget_is_inferred() -> None:
    measured = _row("diffusers", "group_offload", None, s_per_image=3.1, peak_reserved_gib={"cuda:0": 3.2})
    row = decide(Case("diffusers", "group_offload", 4), [measured])
    assert row is not None and row["inferred_from"] == measured["key"] and "3.20" in row["note"]
    assert decide(Case("diffusers", "group_offload", 3), [measured]) is None  # the cap would bite: run it


def test_the_closest_larger_measured_budget_decides() -> None:
    unlimited = _row("diffusers", "to_cuda", None, s_per_image=1.3, peak_reserved_gib={"cuda:0": 24.3})
    capped = _row("diffusers", "to_cuda", 24, status="oom", phase="load")
    row = decide(Case("diffusers", "to_cuda", 16), [unlimited, capped])
    assert row is not None and row["status"] == "oom" and row["inferred_from"] == capped["key"]
    assert decide(Case("diffusers", "to_cuda", 24), [unlimited]) is None  # 24.3 GiB reserved > 24: run it
    inferred = {**capped, "inferred_from": "somewhere"}
    assert decide(Case("diffusers", "to_cuda", 16), [unlimited, inferred]) is None  # only measured rows decide


def test_summary_compares_auto_with_the_fastest_diffusers_mode_that_fit() -> None:
    rows = [
        _row("ours", "auto", 16, strategy="hybrid", s_per_image=1.4, host_peak_rss_gib=15.0),
        _row("ours", "auto", 4, strategy="streamed", s_per_image=2.8, host_peak_rss_gib=22.0),
        _row("diffusers", "model_cpu_offload", 16, s_per_image=14.0),
        _row("diffusers", "group_offload", 16, s_per_image=3.1),
        _row("diffusers", "to_cuda", 16, status="oom"),
        _row("diffusers", "group_offload", 4, s_per_image=2.5),
    ]
    summary = summarize(rows, weights_gib=19.1, budgets=[16, 4])
    at16, at4 = summary["per_budget"]
    assert at16["fastest_diffusers"]["mode"] == "group_offload" and at16["speedup"] == pytest.approx(3.1 / 1.4)
    assert at16["auto_at_least_as_fast"] and not at4["auto_at_least_as_fast"]
    targets = {t["target"].split(" <=")[0].split(" at least")[0]: t for t in summary["targets"]}
    assert targets["auto at 16 GiB"]["met"] and targets["auto at 4 GiB"]["met"]
    assert not targets["auto"]["met"]  # beaten at 4 GiB
    rss = next(t for t in summary["targets"] if t["target"].startswith("host RAM"))
    assert rss["met"] and "ours:auto@4" in rss["measured"]  # 22.0 / 19.1 = 1.15
    assert not summarize([*rows[:1], _row("ours", "streamed", 4, host_peak_rss_gib=30.0)], 19.1, [16])["targets"][-1][
        "met"
    ]


def test_forced_cases_with_settings_and_the_partial_targets() -> None:
    case, extra = forced_case("partial@12:compile=on")
    assert case.key == "ours:partial!compile=on@12" and extra == {"mode": "partial", "options": {"compile": "on"}}
    case, extra = forced_case("full_gpu@16")
    assert case.key == "ours:full_gpu!@16" and extra == {"mode": "full_gpu", "options": {}}
    fp8 = forced_case("partial@8:quantization=fp8,compile=on")[1]
    assert fp8["options"] == {"quantization": "fp8", "compile": "on"}
    assert _label({"kind": "ours", "mode": "partial!quantization=fp8,compile=on"}) == (
        "ours, `partial` forced (quantization=fp8, compile=on)"
    )
    rows = [
        _row("ours", "auto", 12, strategy="partial", s_per_image=1.45, host_peak_rss_gib=23.0),
        _row("ours", "auto", 8, strategy="partial", s_per_image=1.8),
        _row("ours", "auto", 4, strategy="partial", s_per_image=2.1),
        _row("ours", "streamed", 4, strategy="streamed", s_per_image=2.2, host_peak_rss_gib=22.5),
        _row("ours", "partial", 4, strategy="partial", s_per_image=2.1, host_peak_rss_gib=22.6),
        {**_row("ours", "partial!compile=on", 12), "key": "ours:partial!compile=on@12", "s_per_image": 1.1},
    ]
    targets = {t["target"]: t for t in summarize(rows, 19.1, [12, 8, 4])["targets"]}
    assert targets["auto at 12 GiB <= 1.5 s/image"]["met"] and not targets["auto at 8 GiB <= 1.7 s/image"]["met"]
    assert "auto at 6 GiB <= 1.9 s/image" not in targets  # no row at 6 GiB in this run
    assert targets["partial with compile=on at 12 GiB <= 1.2 s/image"]["met"]
    assert targets["auto at 4 GiB no slower than streamed"]["met"]
    assert targets["host RAM peak of partial no more than streamed's"]["met"]
    assert list(targets)[-1].startswith("host RAM peak <=")  # the benchmarks issue's targets keep their places


def test_markdown_replaces_only_its_own_section(tmp_path: Path) -> None:
    report = {
        "created": "2026-11-23T00:00:00+00:00",
        "git_commit": "abc1234",
        "settings": {"size": "1024x1024", "steps": 8, "images": 3},
        "probe": {"environment": {"gpus": ["GPU"]}, "weights_gib": 19.1},
        "cases": [_row("ours", "auto", None, strategy="full_gpu", s_per_image=1.3, dtype="bfloat16")],
        "summary": summarize([_row("ours", "auto", None, strategy="full_gpu", s_per_image=1.3)], 19.1, [None]),
    }
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nintro\n\n## Older results\n\nkept\n")
    write_markdown(report, page, json_name="run.json")
    write_markdown(report, page, json_name="run.json")  # twice: replaced, not appended again
    text = page.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "intro" in text and "kept" in text and "(../benchmarks/results/run.json)" in text
    assert "| unlimited | ours `auto` | full_gpu | 1.30 |" in markdown(report, json_name="run.json")


@pytest.mark.slow
def test_a_cpu_run_of_the_tiny_checkpoint_writes_every_case(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "results" / "bench.json"
    docs = tmp_path / "benchmarks.md"
    common = ["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--device", "cpu", "--size", "256x256"]
    common += ["--steps", "1", "--images", "1", "--diffusers-modes", "to_cuda", "--sweep-sizes", "256x256"]
    # A deadline of 0 s starts no case after the probe: the run says what is missing and exits 3.
    assert main([*common, "--deadline-s", "0"]) == EXIT_INCOMPLETE
    partial = json.loads(out.read_text())
    assert partial["probe"]["status"] == "ok" and partial["cases"] == []
    assert set(partial["missing"]) == {"ours:auto@unlimited", "diffusers:to_cuda@unlimited", "sweep:auto@unlimited"}

    assert main([*common, "--resume", "--docs", str(docs)]) == 0
    report = json.loads(out.read_text())
    rows = {row["key"]: row for row in report["cases"]}
    assert set(rows) == set(partial["missing"]) and report["missing"] == []
    ours, theirs = rows["ours:auto@unlimited"], rows["diffusers:to_cuda@unlimited"]
    assert ours["status"] == theirs["status"] == "ok"
    assert ours["strategy"] == ours["placement"] == "cpu" and ours["fallbacks"] == [] and len(ours["all_s"]) == 1
    # The same image from both sides of the comparison (the reference is our first image).
    assert ours["difference"]["reference"] and theirs["difference"]["max_abs"] == 0
    assert Image.open(out.with_name("bench-reference.png")).size == (256, 256)
    assert rows["sweep:auto@unlimited"]["sizes"][0]["strategy"] == "cpu"
    assert out.with_suffix(".png").is_file()
    assert "ours `auto`" in docs.read_text() and 'diffusers `.to("cuda")`' in docs.read_text()

    # Resuming a complete run runs nothing again.
    before = out.read_text()
    assert main([*common, "--resume"]) == 0
    assert json.loads(out.read_text())["cases"] == json.loads(before)["cases"]

    # Re-measuring one comparison case on a machine without the reference image draws the reference first,
    # so the re-measured row is still compared.
    report["cases"] = [row for row in report["cases"] if row["key"] != "diffusers:to_cuda@unlimited"]
    out.write_text(json.dumps(report))
    out.with_name("bench-reference.png").unlink()
    assert main([*common, "--resume"]) == 0
    again = {row["key"]: row for row in json.loads(out.read_text())["cases"]}
    assert again["diffusers:to_cuda@unlimited"]["difference"]["max_abs"] == 0
    assert "reference" not in again  # the reference image is no case of the report
