"""Where the imports of a load go: the modules that cost the most and the calls that dominate them.

    python benchmarks/import_costs.py --out benchmarks/results/import-costs-DATE.json

In a fresh process (after ``import torch`` and the CUDA context, as in a load), the imports the loader makes
run under ``-X importtime`` and, in a second fresh process, under cProfile. The report keeps the modules with
the most time of their own, the calls with the most time in total and who called
``importlib.metadata.packages_distributions`` (each call stats every installed distribution's files), and how
many distributions this environment has.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_IMPORTS = """
import time, torch
torch.empty(1, device="cuda" if torch.cuda.is_available() else "cpu")
from zimage_turbo.loader import import_model_libraries
import sys
print("LIBRARY IMPORTS FROM HERE", file=sys.stderr, flush=True)
started = time.perf_counter()
import_model_libraries()
print("IMPORTS_S", time.perf_counter() - started)
"""


def _profiled() -> dict[str, Any]:
    import cProfile
    import importlib.metadata
    import io
    import pstats

    import torch

    torch.empty(1, device="cuda" if torch.cuda.is_available() else "cpu")
    from zimage_turbo.loader import import_model_libraries

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    import_model_libraries()
    profiler.disable()
    elapsed = time.perf_counter() - started
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(40)
    stats.print_callers("packages_distributions")
    began = time.perf_counter()
    importlib.metadata.packages_distributions()
    return {
        "imports_profiled_s": elapsed,
        "packages_distributions_once_s": time.perf_counter() - began,
        "distributions": sum(1 for _ in importlib.metadata.distributions()),
        "profile": [line for line in text.getvalue().splitlines() if line.strip()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profiled:
        print("RESULT " + json.dumps(_profiled()), flush=True)
        return 0
    timed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _IMPORTS], capture_output=True, text=True, check=True
    )
    own: list[tuple[int, str]] = []
    for line in timed.stderr.partition("LIBRARY IMPORTS FROM HERE")[2].splitlines():
        if line.startswith("import time:") and "|" in line:
            fields = line.removeprefix("import time:").split("|")
            if fields[0].strip().isdigit():
                own.append((int(fields[0]), fields[2].strip()))
    own.sort(reverse=True)
    plain = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True, check=True)
    profiled = subprocess.run(
        [sys.executable, __file__, "--out", str(args.out), "--profiled"], capture_output=True, text=True, check=True
    )
    result = json.loads(next(line for line in profiled.stdout.splitlines() if line.startswith("RESULT "))[7:])
    report = {
        "benchmark": "import_costs",
        "git_commit": os.environ.get("ZT_GIT_COMMIT", "unknown"),
        "imports_s": float(next(line for line in plain.stdout.splitlines() if line.startswith("IMPORTS_S")).split()[1]),
        "own_seconds_total": sum(us for us, _ in own) / 1e6,
        "most_own_seconds": [[name, us / 1e6] for us, name in own[:40]],
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({key: value for key, value in report.items() if key != "profile"}, indent=1))
    print("\n".join(result["profile"][-25:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
