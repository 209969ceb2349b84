#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a device call: downloads into .whl/ (git-ignored) the wheels
# that the device image lacks for `python3 -m ops.bench` (its python3 is 3.12 with torch, transformers,
# safetensors, tokenizers, numpy, PIL; no diffusers, soxr, soundfile; nothing can be fetched there).
# Then name `.whl` in the device call's `carry` (see ops/gpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download --quiet --dest .whl --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  diffusers soxr soundfile
du -sh .whl && ls .whl
