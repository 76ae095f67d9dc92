#!/usr/bin/env bash
# On the GPU machine, from the repository root: the cold-start timeline (ours from the source, ours from the
# converted copy, plain diffusers) on a checkpoint stored like the published one, into $OUT.
# Carry .whl. Usage: ZT_GIT_COMMIT=abc scripts/device_cold_start.sh [eager|compiled|profile] [rounds]
#   eager     diffusers, ours from the source, ours from the converted copy; page cache warm, then dropped (~8 min)
#   compiled  ours with compile="on" (the blocks) and diffusers' compile_repeated_blocks, the first round from an
#             empty kernel cache and the next from the warm one: what a second process on the same machine pays
#   profile   diffusers and ours on a bf16 checkpoint (laid out as the converted copy reads), the library's log
#             with times and a profile of the main thread kept in the JSON (cold_start.py --profile; ~3 min)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/zimage-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
# bytecode caches, as an installed package has them (the image forbids writing them by default)
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache
python3 -c "import torch, diffusers, transformers, zimage_turbo.generator" 2>/dev/null
if [ "${1:-eager}" = profile ]; then
    [ -f /tmp/full/model_index.json ] || python3 -m zimage_turbo -q make-checkpoint full /tmp/full
    python3 benchmarks/cold_start.py --checkpoint /tmp/full --out "$out/cold_start-profile-h200.json" \
        --cache-dir /tmp/zt-cache --cases diffusers ours --rounds "${2:-2}" --profile 2>&1 | tail -12
    exit
fi
if [ ! -f /tmp/pub/model_index.json ]; then
    python3 -m zimage_turbo -q make-checkpoint full /tmp/pub --published-layout
fi
if [ "${1:-eager}" = compiled ]; then
    python3 benchmarks/cold_start.py --checkpoint /tmp/pub --out "$out/cold_start-compiled-h200.json" \
        --cache-dir /tmp/zt-cache --cases ours_compiled diffusers_compiled --clear-kernel-cache --rounds "${2:-2}" \
        2>&1 | tail -20
    exit
fi
# page cache warm (the first round reads the files in), then one round with it dropped where allowed
python3 benchmarks/cold_start.py --checkpoint /tmp/pub --out "$out/cold_start-warm-h200.json" --cache-dir /tmp/zt-cache \
    --cases diffusers ours ours_converted --rounds "${2:-2}" 2>&1 | tail -12
python3 benchmarks/cold_start.py --checkpoint /tmp/pub --out "$out/cold_start-dropped-h200.json" --cache-dir /tmp/zt-cache \
    --cases diffusers ours ours_converted --rounds 1 --drop-caches 2>&1 | tail -12
