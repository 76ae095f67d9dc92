#!/usr/bin/env bash
# Ray for the GPU machine, which lacks it: its wheel (about 70 MB) is over what a device call carries (64 MiB
# with the working tree), so this writes a slimmed copy without the parts a local Ray batch never loads (the Java
# jar, the dashboard's web client, RLlib) into .whl/ray/ (git-ignored), with the pure-Python packages it needs.
# Usage: scripts/fetch_device_ray.sh [VERSION]; on the device, install .whl/ray/*.whl with pip --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.60.0}
dest=.whl/ray
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$tmp" "ray==$version" jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
    rpds-py==0.30.0
mv "$tmp"/json*.whl "$tmp"/referencing*.whl "$tmp"/rpds*.whl "$dest"/
python3 - "$tmp"/ray-*.whl "$dest" <<'PY'
import sys, zipfile
from pathlib import Path

source, dest = Path(sys.argv[1]), Path(sys.argv[2])
dropped = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/")
with zipfile.ZipFile(source) as whole, zipfile.ZipFile(dest / source.name, "w", zipfile.ZIP_DEFLATED) as slim:
    for info in whole.infolist():
        if not info.filename.startswith(dropped):
            slim.writestr(info, whole.read(info))  # the ZipInfo keeps the executable bits of raylet and gcs_server
PY
ls -la "$dest"
