"""The benchmark harness: zimage-turbo against plain diffusers, side by side, under simulated VRAM budgets.

    zimage-turbo bench --checkpoint DIR --out benchmarks/results/bench-h200.json   (also: benchmarks/run.py)

Every case runs in a fresh process (so that its load time, memory cap and host memory are its own). A VRAM
budget is simulated with ``torch.cuda.set_per_process_memory_fraction``, which our hardware detection sees.
For each budget the harness measures our ``auto``, each of our strategies predicted to fit, and the plain
diffusers modes people write by hand, all at the same number of transformer passes; then a resolution
sweep, and the card's physical limits (bf16 matmul rate, host-to-device bandwidth) for the floors.

Modules: :mod:`.cases` (what to run, and what may be inferred instead of run: pure), :mod:`.worker` (one
case, in its own process), :mod:`.runner` (the run: processes, resume, the JSON file), :mod:`.report`
(markdown tables and the plot, from the JSON alone).
"""

from __future__ import annotations

from .cases import BUDGETS, DIFFUSERS_MODES, Case

__all__ = ["BUDGETS", "DIFFUSERS_MODES", "Case"]
