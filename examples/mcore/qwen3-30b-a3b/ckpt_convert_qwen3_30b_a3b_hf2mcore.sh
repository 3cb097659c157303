#!/bin/bash
# Hugging Face Qwen3-30B-A3B (48 layers, 128 experts, top-8) -> mindlora/Megatron weights for
# TP x PP x EP (override any variable). The training layout may differ: the base is resharded
# at load time.
LOAD_DIR=${LOAD_DIR:-"./model_from_hf/qwen3_30b_a3b_hf"}
SAVE_DIR=${SAVE_DIR:-"./model_weights/qwen3_30b_a3b_mcore"}
TP=${TP:-2}
PP=${PP:-1}
EP=${EP:-4}
python tools/convert_ckpt.py \
    --load-model-type hf --save-model-type mg \
    --model-type-hf qwen3-moe \
    --target-tensor-parallel-size ${TP} --target-pipeline-parallel-size ${PP} \
    --target-expert-parallel-size ${EP} \
    --load-dir ${LOAD_DIR} --save-dir ${SAVE_DIR} \
    --params-dtype ${PARAMS_DTYPE:-bf16} "$@"
