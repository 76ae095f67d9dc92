#!/usr/bin/env bash
# On the GPU machine, from the repository root: the LoRA GPU tests, then the LoRA benchmark, into $OUT.
# Carry .whl (scripts/fetch_device_wheels.sh fetches it). Usage: ZT_GIT_COMMIT=abc scripts/device_lora.sh [tests|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/zimage-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
if [ ! -f /tmp/full/model_index.json ]; then
    python3 -m zimage_turbo -q make-checkpoint full /tmp/full
fi
what=${1:-all}
if [ "$what" = tests ] || [ "$what" = all ]; then
    ZIMAGE_TEST_FULL_CHECKPOINT=/tmp/full python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/gpu/test_gpu_lora.py \
        2>&1 | tee "$out/gpu-tests-lora.log" | tail -25
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    python3 benchmarks/lora.py --checkpoint /tmp/full --out "$out/lora-h200.json" --images 3 2>&1 | tail -40
fi
