#!/bin/bash
# Hugging Face Qwen3-8B -> mindlora/Megatron weights for TP x PP (override any variable).
LOAD_DIR=${LOAD_DIR:-"./model_from_hf/qwen3_8b_hf"}
SAVE_DIR=${SAVE_DIR:-"./model_weights/qwen3_8b_mcore"}
TP=${TP:-1}
PP=${PP:-4}
python tools/convert_ckpt.py \
    --load-model-type hf --save-model-type mg \
    --model-type-hf qwen3 \
    --target-tensor-parallel-size ${TP} --target-pipeline-parallel-size ${PP} \
    --load-dir ${LOAD_DIR} --save-dir ${SAVE_DIR} \
    --params-dtype bf16 "$@"
