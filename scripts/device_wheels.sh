#!/usr/bin/env bash
# Here, before a device call: the wheels the GPU machine's image lacks, into .whl/ (git-ignored).
# The image has torch, triton, transformers, accelerate, safetensors, tokenizers, imageio and pytest
# (the device tool's KINDS.md); vdit-sparse also needs diffusers and Hydra.
#
#     bash scripts/device_wheels.sh      # then carry ".whl" in each device call (scripts/device_check.sh)
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 hydra-core==1.3.2 omegaconf==2.3.0
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # only an sdist on PyPI; pure Python
ls -l .whl
