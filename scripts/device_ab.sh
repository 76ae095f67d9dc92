#!/usr/bin/env bash
# On the GPU machine, from the repository root: the bench harness's cases for two source trees side by side,
# each case in a fresh process, into $OUT/ab-before.json and $OUT/ab-after.json (behaviour-preserving changes
# must time the same). The "before" tree is a copy of src/ from another commit, e.g.
#   mkdir -p .ab/before && git archive COMMIT src | tar -x -C .ab/before
# carried to the machine (carry ".ab").
# Usage: BEFORE_COMMIT=abc AFTER_COMMIT=def scripts/device_ab.sh .ab/before/src [bench arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
before=$(cd "$1" && pwd)
shift
out=${OUT:-/tmp/zimage-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -3
export PYTHONUNBUFFERED=1
if [ ! -f /tmp/full/model_index.json ]; then
    PYTHONPATH=/tmp/site:$PWD/src python3 -m zimage_turbo -q make-checkpoint full /tmp/full
fi
for side in before after; do
    if [ "$side" = before ]; then src=$before commit=${BEFORE_COMMIT:-unknown}; else src=$PWD/src commit=${AFTER_COMMIT:-unknown}; fi
    PYTHONPATH=/tmp/site:$src ZT_GIT_COMMIT=$commit \
        python3 -m zimage_turbo bench --checkpoint /tmp/full --out "$out/ab-$side.json" "$@" 2>&1 | tail -12
done
