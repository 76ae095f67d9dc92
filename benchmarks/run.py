"""The benchmark harness: zimage-turbo against plain diffusers under every VRAM budget (also `zimage-turbo bench`).

    python benchmarks/run.py --checkpoint /tmp/full --out benchmarks/results/bench-h200-DATE.json \
        --docs docs/benchmarks.md

See ``zimage_turbo.bench`` (src/zimage_turbo/bench/) for what it measures and how.
"""

from __future__ import annotations

from zimage_turbo.bench.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
