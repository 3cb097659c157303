#!/bin/bash
# On the CPU machine, before the one GPU call (docs/gpu.md, /work/shared/GPU.md): download the
# megatron-core wheel for the GPU machine's Python 3.12 into .whl/ (git-ignored locally), so
# `run` can carry it there (the GPU machine has no network and no megatron-core).
set -euo pipefail
cd "$(dirname "$0")/../.."
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
${PYTHON:-python3} -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1
# its other requirements (torch, numpy, packaging) are on the GPU machine already
unzip -p .whl/megatron_core-*.whl '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true
ls -l .whl
