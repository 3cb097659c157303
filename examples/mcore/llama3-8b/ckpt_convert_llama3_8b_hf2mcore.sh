#!/bin/bash
# Hugging Face Llama-3-8B -> mindlora/Megatron weights for TP x PP (override any variable).
LOAD_DIR=${LOAD_DIR:-"./model_from_hf/llama3_8b_hf"}
SAVE_DIR=${SAVE_DIR:-"./model_weights/llama3_8b_mcore"}
TP=${TP:-2}
PP=${PP:-2}
python tools/convert_ckpt.py \
    --load-model-type hf --save-model-type mg \
    --model-type-hf llama \
    --target-tensor-parallel-size ${TP} --target-pipeline-parallel-size ${PP} \
    --load-dir ${LOAD_DIR} --save-dir ${SAVE_DIR} \
    --params-dtype bf16 "$@"
