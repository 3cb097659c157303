#!/bin/bash
# The quickstart's tiny Qwen3 HF model -> mindlora/Megatron weights (TP x PP overridable).
LOAD_DIR=${LOAD_DIR:-"./quickstart_out/qwen3_tiny_hf"}
SAVE_DIR=${SAVE_DIR:-"./quickstart_out/qwen3_tiny_mcore"}
TP=${TP:-2}
PP=${PP:-1}
${PYTHON:-python} tools/convert_ckpt.py \
    --load-model-type hf --save-model-type mg \
    --model-type-hf qwen3 \
    --target-tensor-parallel-size ${TP} --target-pipeline-parallel-size ${PP} \
    --load-dir ${LOAD_DIR} --save-dir ${SAVE_DIR} \
    --params-dtype fp32 "$@"
