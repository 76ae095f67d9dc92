"""Does ``compile="auto"`` compile for a call of 10 images in a second process? (issue 22, on the GPU machine)

Process 1 runs ``compile="on"`` for three images into a fresh cache folder: it compiles the blocks, records
what the compile cost and what it saved (``torch-compile/zimage-turbo-compile-times.json``), and leaves
Inductor's kernels.
Process 2, on the same cache folder, asks ``compile="auto"`` for ``generate_many`` of ``--images`` prompts and
reports at which image the blocks were compiled and the seconds of each; then process 3 does the same with the
saving record removed (the default saving), for comparison. One JSON line per process, and the whole into
``$OUT/compile_auto.json``.

    python3 scripts/compile_auto_check.py --checkpoint /tmp/full --images 10 --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

_CHILD = textwrap.dedent(
    """
    import json, sys, time
    spec = json.loads(sys.argv[1])
    started = time.perf_counter()
    from zimage_turbo import Generator, ZImageSettings
    settings = ZImageSettings(
        model=spec["model"], source="local", progress=False, cache_dir=spec["cache"], compile=spec["compile"]
    )
    gen = Generator(settings=settings).load()
    prompts = [f"a lighthouse on a rocky coast, study {i}" for i in range(spec["images"])]
    results = gen.generate_many(prompts, height=1024, width=1024, seed=1)
    print("RESULT " + json.dumps({
        "compile": spec["compile"],
        "strategy": results[-1].strategy,
        "compiled": [list(r.compiled) for r in results],
        "seconds": [round(r.timings.work, 3) for r in results],
        "denoise": [round(r.timings.denoise, 3) for r in results],
        "total_s": round(time.perf_counter() - started, 2),
    }))
    """
)


def _run(model: str, cache: Path, compile_mode: str, images: int) -> dict[str, Any]:
    spec = {"model": model, "cache": str(cache), "compile": compile_mode, "images": images}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"compile": compile_mode, "error": done.stderr[-3000:]}
    row: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    records = cache / "torch-compile" / "zimage-turbo-compile-times.json"
    row["records_after"] = json.loads(records.read_text()) if records.is_file() else {}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="zimage-turbo-compile-auto-"))
    rows = [_run(args.checkpoint, cache, "on", 3), _run(args.checkpoint, cache, "auto", args.images)]
    records = cache / "torch-compile" / "zimage-turbo-compile-times.json"
    if records.is_file():  # the same with the default saving: drop what process 1 measured
        kept = {k: v for k, v in json.loads(records.read_text()).items() if not k.endswith(" / saving")}
        records.write_text(json.dumps(kept))
        rows.append(_run(args.checkpoint, cache, "auto", args.images))
    for row in rows:
        print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_auto.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
