#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks into .whl/ (git-ignored), for Python 3.12 on x86-64 Linux.
# The GPU image already has torch, transformers, accelerate, safetensors, huggingface_hub, psutil and pillow;
# it lacks diffusers, pydantic-settings (and the pydantic it needs), importlib_metadata, torchao (quantization)
# and peft (diffusers' LoRA loading, which the LoRA tests and benchmark compare with).
# Into .whl/peers/: mmgp with optimum-quanto and ninja, the bench's optional peer baseline (its "mmgp" rows are
# skipped where it is not installed). Kept apart so that .whl/*.whl leaves the libraries' imports as they were
# (transformers and diffusers look for optimum-quanto); install them only for a bench run that compares with mmgp.
# Usage: scripts/fetch_device_wheels.sh   (then carry .whl and install it there with --no-deps into a target dir)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$dest" \
    diffusers==0.42.1 importlib_metadata==8.7.0 peft==0.21.2 \
    pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.2 \
    typing-inspection==0.4.4 annotated-types==0.7.0 typing-extensions==4.16.0 \
    --platform manylinux_2_24_x86_64 torchao==0.18.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$dest/peers" mmgp==3.8.2 optimum-quanto==0.2.7 ninja==1.13.2
ls -la "$dest" "$dest/peers"
