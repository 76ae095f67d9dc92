#!/usr/bin/env bash
# On the GPU machine, from the repository root (carry .whl: scripts/fetch_device_wheels.sh): the partial placement
# (issue 21) on an H200 with the full-size random-weight checkpoint, into $OUT. Two commands, each under 10 minutes:
#
#   scripts/device_partial.sh tests   # tests/gpu/test_gpu_partial.py: partial under 6/8/12 GiB caps against full_gpu's
#                                     # image, auto at 8 GiB, an OOM halving the resident blocks, fp8, compile, and
#                                     # this GPU's measured speeds -> $OUT/gpu-tests-partial.log (about 7 minutes)
#   scripts/device_partial.sh bench   # the bench harness at 12, 8, 6, 4 GiB: auto, streamed, partial, diffusers'
#                                     # group offload (and mmgp when installed), bf16 eager; then partial with compile
#                                     # at 12 GiB and with fp8 (eager, compiled) at 8 GiB; 1024x1024, 8 passes, each
#                                     # case in a fresh process -> $OUT/bench-partial.json (.png, .md). It stops
#                                     # starting cases after 6 minutes: call it again to finish (it resumes from its
#                                     # JSON in /tmp while the machine stays warm, else from BENCH_RESUME, a copy of
#                                     # the last call's JSON carried in the tree), usually twice in all.
#   scripts/device_partial.sh speeds  # `zimage-turbo hardware` (measures and shows this GPU's speeds), a few seconds
#   scripts/device_partial.sh lookahead  # partial with lookahead 1 and 2 (the default) at 12/8/6/4 GiB, same weights
#                                     # (scripts/partial_lookahead.py, each traced -> $OUT/partial_lookahead.json), the GPU
#                                     # tests of lookahead 1 at 8 and 3 at 6 GiB against full_gpu's image (about 6 minutes)
#   scripts/device_partial.sh compiled   # partial at 12 GiB compiled (resident blocks whole, streamed ones' insides),
#                                     # lookahead 2 then 1 in one process with attention="native" as the bench uses,
#                                     # then the bench harness's fresh-process case (1.09 s at b6f5422)
#                                     # -> $OUT/partial_lookahead.json, $OUT/bench-compile.json
#
# Give the commit on the command line, ZT_GIT_COMMIT=<short hash> bash scripts/device_partial.sh bench: the copy of
# the tree on the GPU machine may carry a stale .git, and the bench records the commit it ran on.
# Building the checkpoint takes about 40 s the first time on a machine (/tmp/full is kept while it stays warm).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/zimage-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
if [ ! -f /tmp/full/model_index.json ]; then
    python3 -m zimage_turbo -q make-checkpoint full /tmp/full
fi
case "${1:-}" in
tests)
    ZIMAGE_TEST_FULL_CHECKPOINT=/tmp/full timeout 520 python3 -m pytest -q -s -m gpu -p no:cacheprovider \
        tests/gpu/test_gpu_partial.py 2>&1 | tee "$out/gpu-tests-partial.log" | grep -v "^$" | tail -60
    ;;
bench)
    # kept in /tmp between calls ($OUT starts empty at each call) and copied to $OUT after each
    work=/tmp/zimage-bench
    mkdir -p "$work"
    json="$work/bench-partial.json"
    if [ ! -f "$json" ] && [ -n "${BENCH_RESUME:-}" ] && [ -f "$BENCH_RESUME" ]; then
        cp "$BENCH_RESUME" "$json"  # the first call's JSON, carried in the tree for a second call on a fresh machine
    fi
    resume=()
    [ -f "$json" ] && resume=(--resume)
    # the peer baseline (mmgp, from .whl/peers), for this command only: it makes optimum-quanto importable, which
    # changes what transformers and diffusers import, not the seconds per image the bench measures
    if compgen -G ".whl/peers/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers .whl/peers/*.whl 2>&1 | tail -3
    fi
    PYTHONPATH=/tmp/peers:$PYTHONPATH timeout 540 python3 -m zimage_turbo bench --checkpoint /tmp/full --out "$json" --docs "$work/bench-partial.md" \
        --budgets 12 8 6 4 --strategies streamed partial --diffusers-modes group_offload mmgp --sweep-budgets \
        --images 3 --deadline-s 380 ${resume[@]+"${resume[@]}"} \
        --forced partial@12:compile=on partial@8:quantization=fp8 partial@8:quantization=fp8,compile=on 2>&1 | tail -40
    status=${PIPESTATUS[0]}
    cp "$work"/bench-partial* "$out"/ 2>/dev/null
    if [ "$status" != 0 ]; then echo "bench: exit status $status; run 'scripts/device_partial.sh bench' again to finish"; fi
    ;;
speeds)
    python3 -m zimage_turbo hardware
    ;;
lookahead)
    timeout 240 python3 scripts/partial_lookahead.py --checkpoint /tmp/full --caps 12 8 6 4 --images 3 --trace \
        --out "$out" \
        2>&1 | grep -v Warning | tail -12
    ZIMAGE_TEST_FULL_CHECKPOINT=/tmp/full timeout 300 python3 -m pytest -q -s -m gpu -p no:cacheprovider \
        tests/gpu/test_gpu_partial.py -k another_lookahead 2>&1 | tee "$out/gpu-tests-lookahead.log" \
        | grep -v "^$" | tail -20
    ;;
compiled)
    timeout 220 python3 scripts/partial_lookahead.py --checkpoint /tmp/full --caps 12 --lookaheads 2 1 --images 3 \
        --compile --attention native --out "$out" 2>&1 | grep -v Warning | tail -4
    timeout 200 python3 -m zimage_turbo bench --checkpoint /tmp/full --out "$out/bench-compile.json" \
        --docs "$out/bench-compile.md" --budgets 12 --strategies partial --diffusers-modes --images 3 \
        --forced partial@12:compile=on 2>&1 | tail -6
    ;;
*)
    echo "usage: scripts/device_partial.sh tests|bench|speeds|lookahead|compiled" >&2
    exit 2
    ;;
esac
