"""What a benchmark run measures, and which cases need no run of their own (pure functions of rows).

A *row* is the JSON object one case produced (see :mod:`.worker`), with at least ``key``, ``kind``, ``mode``,
``budget_gib`` and ``status`` (``ok``, ``oom``, ``error`` or ``skipped``).

Why some cases are inferred instead of run: ``set_per_process_memory_fraction`` changes nothing until the
caching allocator would hold more than the cap. A forced placement (a diffusers mode, or one of our strategies
by name) whose run under a larger budget never reserved more than a smaller budget would therefore take the
very same allocations, kernels and time under the smaller one; and a placement that ran out of memory under
a budget runs out under every smaller one. Such cases are copied from the run that decides them, marked
``inferred_from`` with the reason, and every other case runs. ``auto`` always runs: it reads the budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "BUDGETS",
    "DIFFUSERS_MODES",
    "OPTIONAL_MODES",
    "OUR_STRATEGIES",
    "SWEEP_BUDGETS",
    "SWEEP_SIZES",
    "Case",
    "budget_label",
    "decide",
    "forced_case",
    "summarize",
]

Row = dict[str, Any]
Kind = Literal["ours", "diffusers", "sweep"]

# None = the whole card.
BUDGETS: tuple[float | None, ...] = (None, 24, 16, 12, 8, 6, 4)
# Our named strategies, measured where the planner predicts they fit (multi_gpu only with two or more GPUs).
OUR_STRATEGIES = ("full_gpu", "multi_gpu", "hybrid", "partial", "model_offload", "streamed", "sequential_offload")
# What people write by hand with plain diffusers (see worker.py for the exact calls).
DIFFUSERS_MODES = ("to_cuda", "model_cpu_offload", "sequential_cpu_offload", "group_offload")
# Measured only when asked for (--diffusers-modes): another library, skipped where it is not installed.
OPTIONAL_MODES = ("mmgp",)
SWEEP_SIZES: tuple[tuple[int, int], ...] = (
    (512, 512),
    (768, 768),
    (1024, 1024),
    (1536, 1536),
    (2048, 2048),
    (1024, 768),
)
SWEEP_BUDGETS: tuple[float | None, ...] = (None, 12)

# Targets of the benchmarks issue (1024x1024, bf16, 8 passes).
TARGET_16_GIB_S = 2.0
TARGET_4_GIB_S = 3.5
TARGET_HOST_RSS_RATIO = 1.3
# Targets of the mid-size cards issue (partial residency), each checked when the run has its rows: auto at these
# budgets; forced partial with compile at 12 GiB and with fp8 at 8 GiB.
TARGET_AUTO_S = {12.0: 1.5, 8.0: 1.7, 6.0: 1.9}
TARGET_FORCED_S = {"ours:partial!compile=on@12": 1.2, "ours:partial!quantization=fp8,compile=on@8": 1.2}


def budget_label(budget: float | None) -> str:
    return "unlimited" if budget is None else f"{budget:g}"


def _larger(a: float | None, b: float | None) -> bool:
    """Budget ``a`` is larger than ``b`` (None = unlimited)."""
    if a is None:
        return b is not None
    return b is not None and a > b


@dataclass(frozen=True)
class Case:
    """One measurement: a kind (``ours``, ``diffusers``, ``sweep``), a mode (``auto``, a strategy name or a
    diffusers mode) and a VRAM budget in GiB (None: the whole card)."""

    kind: Kind
    mode: str
    budget_gib: float | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.mode}@{budget_label(self.budget_gib)}"


def decide(case: Case, rows: Sequence[Row]) -> Row | None:
    """A row for ``case`` derived from rows already measured, or None when the case must run."""
    if case.kind == "sweep" or (case.kind == "ours" and case.mode == "auto"):
        return None
    if case.kind == "ours":
        auto = _find(rows, Case("ours", "auto", case.budget_gib).key)
        if auto is not None and auto["status"] == "ok" and _is_plain(auto) and auto.get("strategy") == case.mode:
            return _copy(auto, case, f"auto chose {case.mode} at this budget with no fallback: the same run")
    measured = [
        row
        for row in rows
        if row.get("kind") == case.kind
        and row.get("mode") == case.mode
        and not row.get("inferred_from")
        and row.get("status") in ("ok", "oom")
        and _larger(row.get("budget_gib"), case.budget_gib)
    ]
    # The closest larger budget decides.
    for row in sorted(measured, key=lambda r: float("inf") if r["budget_gib"] is None else r["budget_gib"]):
        if row["status"] == "oom":
            return _copy(row, case, f"ran out of memory under {budget_label(row['budget_gib'])} GiB already")
        reserved = max(row.get("peak_reserved_gib", {}).values(), default=None)
        cap = case.budget_gib
        if row["status"] == "ok" and reserved is not None and cap is not None and reserved <= cap and _is_plain(row):
            return _copy(
                row,
                case,
                f"its run under {budget_label(row['budget_gib'])} GiB never reserved more than "
                f"{reserved:.2f} GiB, so this cap would not have been reached",
            )
        return None
    return None


def _is_plain(row: Row) -> bool:
    return not row.get("fallbacks") and not row.get("vae_tiling")


def _copy(row: Row, case: Case, reason: str) -> Row:
    copied = dict(row)
    copied.update(key=case.key, kind=case.kind, mode=case.mode, budget_gib=case.budget_gib)
    copied.update(inferred_from=row["key"], note=reason)
    return copied


def _find(rows: Iterable[Row], key: str) -> Row | None:
    return next((row for row in rows if row.get("key") == key), None)


def summarize(rows: Sequence[Row], weights_gib: float, budgets: Sequence[float | None] = BUDGETS) -> dict[str, Any]:
    """Per budget: our auto against the fastest plain-diffusers mode that did not run out of memory; and the
    issue's targets, each with its measured value and whether it was met."""
    per_budget: list[dict[str, Any]] = []
    for budget in budgets:
        auto = _find(rows, Case("ours", "auto", budget).key)
        theirs = [
            row
            for row in rows
            if row.get("kind") == "diffusers" and row.get("budget_gib") == budget and row.get("status") == "ok"
        ]
        fastest = min(theirs, key=lambda r: r["s_per_image"], default=None)
        entry: dict[str, Any] = {"budget_gib": budget, "auto": None, "fastest_diffusers": None}
        if auto is not None and auto.get("status") == "ok":
            entry["auto"] = {"strategy": auto.get("strategy"), "s_per_image": auto["s_per_image"]}
        if fastest is not None:
            entry["fastest_diffusers"] = {"mode": fastest["mode"], "s_per_image": fastest["s_per_image"]}
        if entry["auto"] and fastest is not None:
            entry["speedup"] = fastest["s_per_image"] / entry["auto"]["s_per_image"]
            entry["auto_at_least_as_fast"] = entry["auto"]["s_per_image"] <= fastest["s_per_image"]
        elif entry["auto"]:
            entry["auto_at_least_as_fast"] = True  # every diffusers mode ran out of memory here
        per_budget.append(entry)

    targets: list[dict[str, Any]] = []

    def auto_seconds(budget: float) -> float | None:
        row = _find(rows, Case("ours", "auto", budget).key)
        return row["s_per_image"] if row is not None and row.get("status") == "ok" else None

    for budget, limit in ((16.0, TARGET_16_GIB_S), (4.0, TARGET_4_GIB_S)):
        value = auto_seconds(budget)
        targets.append(
            {
                "target": f"auto at {budget:g} GiB <= {limit} s/image",
                "measured": value,
                "met": value is not None and value <= limit,
            }
        )
    targets += _partial_targets(rows)
    beaten = [e for e in per_budget if e.get("auto_at_least_as_fast") is False]
    measured_budgets = [e for e in per_budget if e["auto"]]
    targets.append(
        {
            "target": "auto at least as fast as the fastest plain-diffusers mode that does not run out of memory, "
            "at every budget",
            "measured": ", ".join(
                f"{budget_label(e['budget_gib'])}: {e['auto']['s_per_image']:.2f} vs "
                + (f"{e['fastest_diffusers']['s_per_image']:.2f}" if e["fastest_diffusers"] else "all OOM")
                for e in measured_budgets
            ),
            "met": bool(measured_budgets) and not beaten,
        }
    )
    ours = [row for row in rows if row.get("kind") == "ours" and row.get("status") == "ok"]
    worst = max(ours, key=lambda r: r.get("host_peak_rss_gib", 0.0), default=None)
    ratio = worst.get("host_peak_rss_gib", 0.0) / weights_gib if worst is not None and weights_gib else None
    targets.append(
        {
            "target": f"host RAM peak <= {TARGET_HOST_RSS_RATIO} x the weights in every strategy",
            "measured": None if worst is None or ratio is None else f"{ratio:.2f} x (worst: {worst['key']})",
            "met": ratio is not None and ratio <= TARGET_HOST_RSS_RATIO,
        }
    )
    return {"per_budget": per_budget, "targets": targets}


def _partial_targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The mid-size cards issue's targets that this run has rows for."""

    def seconds(key: str) -> float | None:
        row = _find(rows, key)
        return row.get("s_per_image") if row is not None and row.get("status") == "ok" else None

    limits: list[tuple[str, str, float]] = []  # (what, row key, seconds)
    for budget, limit in TARGET_AUTO_S.items():
        limits.append((f"auto at {budget:g} GiB", Case("ours", "auto", budget).key, limit))
    for key, limit in TARGET_FORCED_S.items():
        limits.append((key.split(":", 1)[1].replace("!", " with ").replace("@", " at ") + " GiB", key, limit))
    targets: list[dict[str, Any]] = []
    for what, key, limit in limits:
        if _find(rows, key) is not None:
            value = seconds(key)
            met = value is not None and value <= limit
            targets.append({"target": f"{what} <= {limit} s/image", "measured": value, "met": met})
    auto, streamed = seconds(Case("ours", "auto", 4).key), seconds(Case("ours", "streamed", 4).key)
    if auto is not None and streamed is not None:
        targets.append(
            {
                "target": "auto at 4 GiB no slower than streamed",
                "measured": f"{auto:.2f} vs {streamed:.2f}",
                "met": auto <= streamed * 1.02,  # within the noise of two runs
            }
        )
    compared = []  # (partial's host peak, streamed's, partial's key) at each budget that has both
    for row in rows:
        if row.get("kind") != "ours" or row.get("mode") != "partial" or row.get("status") != "ok":
            continue
        theirs = _find(rows, Case("ours", "streamed", row["budget_gib"]).key)
        if theirs is not None and theirs.get("status") == "ok":
            compared.append((row.get("host_peak_rss_gib", 0.0), theirs.get("host_peak_rss_gib", 0.0), row["key"]))
    if compared:
        ours, streamed_rss, key = max(compared, key=lambda entry: entry[0] - entry[1])
        targets.append(
            {
                "target": "host RAM peak of partial no more than streamed's",
                "measured": f"{ours:.1f} vs {streamed_rss:.1f} GiB ({key})",
                "met": ours <= streamed_rss * 1.02,
            }
        )
    return targets


def forced_case(spec: str) -> tuple[Case, dict[str, Any]]:
    """``STRATEGY@BUDGET`` or ``STRATEGY@BUDGET:setting=value,...`` (``--forced``): the case, and what its worker
    gets besides (the strategy to force, the settings). The mode says it is forced, and with which settings:
    ``partial@12:compile=on`` is ``ours:partial!compile=on@12``."""
    name, _, rest = spec.partition("@")
    cap, _, settings = rest.partition(":")
    budget = None if cap in ("", "none", "unlimited") else float(cap)
    options = dict(item.split("=", 1) for item in settings.split(",") if "=" in item)
    return Case("ours", f"{name}!{settings}", budget), {"mode": name, "options": options}


def fitting_strategies(plans: Mapping[str, Sequence[Mapping[str, Any]]], budget: float | None) -> list[str]:
    """Our strategies that the probe's plan predicted to fit under ``budget``, without VAE tiling."""
    return [
        candidate["strategy"]
        for candidate in plans.get(budget_label(budget), ())
        if candidate["fits"] and not candidate["vae_tiling"] and candidate["strategy"] in OUR_STRATEGIES
    ]
