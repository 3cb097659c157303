#!/bin/bash
# Every GPU check in one call, on a lent GPU machine (docs/gpu.md). From the repository root:
#
#   bash tests/gpu/prepare_wheels.sh                     # here, once: megatron-core -> .whl/
#   run(command="bash tests/gpu/run_on_device.sh", carry=[".whl"], timeout_s=600)
#
# Installs the carried megatron-core wheel into /tmp/site (never `pip install -e .` there: the
# project's torch pin does not apply to that image), records the GPU and versions, runs
# tests/gpu (plus the static and runtime checks), then bench/train.py --device cuda (Qwen3-8B
# shapes, bf16, 4 x 4096 tokens, r 16) beside HF+PEFT. Logs go to $OUT (the `run` tool's folder).
# PARTS="tests" or PARTS="bench" runs one half; BENCH_ARGS adds flags (e.g. "--tiny").
# Budget (estimated, never measured): tests ~3 min, bench ~4 min (most of it writing and loading
# the 16 GB random base checkpoint); each half has its own timeout (TESTS_/BENCH_TIMEOUT, s).
set -u
OUT=${OUT:-$PWD/gpu_out}
PARTS=${PARTS:-"tests bench"}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch, transformers, peft, megatron.core as m
print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda,
      '| transformers', transformers.__version__, '| peft', peft.__version__,
      '| megatron-core', m.__version__)"
} 2>&1 | tee "$OUT/env.txt"
python3 -c "import megatron.core" 2>/dev/null || {
    echo "megatron-core is not importable: run tests/gpu/prepare_wheels.sh here and carry .whl"
    exit 1
}
rc=0
if [[ " $PARTS " == *" tests "* ]]; then
    timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest tests/gpu/test_cuda_training.py tests/static \
        tests/runtime/test_device.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
    rc=${PIPESTATUS[0]}
fi
if [[ " $PARTS " == *" bench "* ]]; then
    timeout "${BENCH_TIMEOUT:-330}" python3 bench/train.py --device cuda --workdir /tmp \
        ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu-bench.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
exit $rc
