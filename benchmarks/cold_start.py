"""Cold start: from process start to the first image, step by step, in a fresh process.

    python benchmarks/cold_start.py --checkpoint DIR --out benchmarks/results/cold_start-h200-DATE.json

Marks the seconds since the process started after each step (starting Python, importing torch, creating the
CUDA context, importing zimage_turbo, loading, which imports diffusers and transformers first, as in an app,
the first and second image), prints the library's own log lines with the same clock, and also times
``python -c "import torch"`` alone in a child process. Run it right after another process read the checkpoint
("from page cache").

Run it twice, and quote the second run: the first fills Python's bytecode caches, as ``pip install`` does at
install time. Where the site-packages cannot be written, or ``PYTHONDONTWRITEBYTECODE`` is set (our GPU
machine's image sets it, and its torch has no ``.pyc`` files), set ``PYTHONPYCACHEPREFIX`` to a writable folder
and unset ``PYTHONDONTWRITEBYTECODE``: otherwise every start compiles torch, transformers and diffusers from
source again (about 8 s there). The report records which it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

_START = psutil.Process().create_time()


def since_start() -> float:
    return time.time() - _START


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    marks: list[tuple[str, float]] = [("python started, script running", since_start())]

    def mark(step: str) -> None:
        marks.append((step, since_start()))
        print(f"{since_start():7.2f} s  {step}", flush=True)

    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms since logging began  %(message)s")
    logging.getLogger("zimage_turbo").setLevel(logging.DEBUG)
    import torch

    mark("import torch")
    torch.empty(1, device="cuda")
    mark("CUDA context")
    import zimage_turbo  # light: diffusers and transformers are imported by the first load, as in an app

    mark("import zimage_turbo")
    settings = zimage_turbo.ZImageSettings(progress=False, source="local")
    generator = zimage_turbo.Generator(model=args.checkpoint, settings=settings).load()
    torch.cuda.synchronize()
    label = generator.strategy.label if generator.strategy else "-"
    mark(f"diffusers and transformers imported, weights loaded and placed ({label})")
    first = generator.generate("a red fox in the snow", height=args.size, width=args.size, seed=1)
    mark("first image")
    second = generator.generate("a red fox in the snow", height=args.size, width=args.size, seed=2)
    mark("second image")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    import_torch_alone = time.perf_counter() - started
    report: dict[str, Any] = {
        "benchmark": "cold_start",
        "gpu": torch.cuda.get_device_name(0),
        "marks": [{"step": step, "since_process_start_s": value} for step, value in marks],
        "first_image_timings": vars(first.timings),
        "second_image_timings": vars(second.timings),
        "python_c_import_torch_s": import_torch_alone,
        "bytecode": {
            "written": not sys.dont_write_bytecode,
            "pycache_prefix_set": sys.pycache_prefix is not None,
            "torch_cached": _has_bytecode(torch.__file__),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"python -c 'import torch' alone: {import_torch_alone:.2f} s", flush=True)
    return 0


def _has_bytecode(source: str) -> bool:
    """Whether Python finds a cached ``.pyc`` for this module file (beside it, or under PYTHONPYCACHEPREFIX)."""
    import importlib.util

    return Path(importlib.util.cache_from_source(source)).is_file()


if __name__ == "__main__":
    raise SystemExit(main())
