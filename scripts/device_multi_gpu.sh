#!/usr/bin/env bash
# On a machine with two to four GPUs (the device tool's nvidia-h200-x2 / -x4), from the repository root:
# install the carried wheels (scripts/fetch_device_wheels.sh, scripts/fetch_device_ray.sh), build the full-size
# checkpoint once, run one part of benchmarks/multi_gpu.py into $OUT, and check the report with the GPU tests.
# Usage: [BENCH_ARGS="--images 3"] [START_FROM=report.json] scripts/device_multi_gpu.sh placements|throughput|all [more GPU test files]
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
shift || true
out=${OUT:-/tmp/zimage-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl/ray/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
if [ ! -f /tmp/full/model_index.json ]; then
    python3 -m zimage_turbo -q make-checkpoint full /tmp/full || python3 -m zimage_turbo make-checkpoint full /tmp/full
fi
# a report to add to (cases run again replace theirs)
[ -n "${START_FROM:-}" ] && cp "$START_FROM" "$out/multi_gpu.json"
ZT_GIT_COMMIT=${ZT_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)} \
    python3 benchmarks/multi_gpu.py --checkpoint /tmp/full --out "$out/multi_gpu.json" --part "$part" ${BENCH_ARGS:-}
ZIMAGE_TEST_MULTI_GPU_JSON="$out/multi_gpu.json" ZIMAGE_TEST_FULL_CHECKPOINT=/tmp/full \
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_multi_gpu.py "$@" 2>&1 | tee "$out/gpu-tests.log" | tail -40
