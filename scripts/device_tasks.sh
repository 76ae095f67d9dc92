#!/usr/bin/env bash
# On the GPU machine (the device tool's nvidia-h200), from the repository root: image-to-image, inpainting and
# ControlNet (issue 20). Installs the carried wheels (scripts/fetch_device_wheels.sh), builds the full-size
# checkpoint with its ControlNet once into /tmp/full, runs the GPU tests of the tasks (TESTS: which test files,
# default both), then benchmarks/tasks.py into "$OUT" (tasks-h200.json, its
# reference images, gpu-tasks-tests.log). Everything stops in time for the device tool's 600 s limit; run it again
# on the same (warm) machine and the benchmark resumes where it stopped.
# Usage: [START_FROM=tasks-h200.json] bash scripts/device_tasks.sh [all|tests|bench] [more benchmarks/tasks.py arguments]
# (START_FROM: a report of an earlier run to continue, for a machine that no longer has /tmp/tasks-h200.json)
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
shift || true
out=${OUT:-/tmp/zimage-out}
mkdir -p "$out"
started=$SECONDS
limit=${LIMIT_S:-570}  # seconds this script may take in all
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
if [ ! -f /tmp/full/controlnet/config.json ]; then
    python3 -m zimage_turbo -q make-checkpoint full /tmp/full --controlnet --overwrite || exit 1
fi
echo "checkpoint ready after $((SECONDS - started)) s"
if [ "$part" != bench ]; then
    ZIMAGE_TEST_FULL_CHECKPOINT=/tmp/full timeout $((limit - (SECONDS - started))) \
        python3 -m pytest -q -s -p no:cacheprovider -m gpu \
        ${TESTS:-tests/gpu/test_gpu_tasks.py tests/gpu/test_gpu_controlnet.py} 2>&1 \
        | tee "$out/gpu-tasks-tests.log" | grep -E "diff|passed|failed|Error|error" | tail -20
    echo "tests done after $((SECONDS - started)) s"
fi
if [ "$part" != tests ]; then
    left=$((limit - (SECONDS - started)))
    if [ "$left" -lt 60 ]; then
        echo "no time left for the benchmark: run 'bash scripts/device_tasks.sh bench' next"
        exit 0
    fi
    # each case in a process of its own; --resume: a second run continues a cut-short one
    if [ -n "${START_FROM:-}" ]; then cp "$START_FROM" "$out/tasks-h200.json"; fi
    [ -f "$out/tasks-h200.json" ] || { [ -f /tmp/tasks-h200.json ] && cp /tmp/tasks-h200.json "$out/"; }
    [ -d /tmp/tasks-h200-references ] && cp -rn /tmp/tasks-h200-references "$out/"  # what later cases compare with
    ZT_GIT_COMMIT=${ZT_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} \
        timeout "$left" python3 benchmarks/tasks.py --checkpoint /tmp/full --out "$out/tasks-h200.json" --resume "$@"
    cp "$out/tasks-h200.json" /tmp/tasks-h200.json 2>/dev/null  # for a resumed run on this machine
    cp -r "$out/tasks-h200-references" /tmp/ 2>/dev/null
    echo "benchmark stopped after $((SECONDS - started)) s"
fi
