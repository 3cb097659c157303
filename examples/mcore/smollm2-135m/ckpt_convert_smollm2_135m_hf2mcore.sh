#!/bin/bash
# SmolLM2-135M-Instruct (Llama architecture, tied embeddings) HF -> mindlora/Megatron weights.
# 9 attention heads / 3 KV heads: TP is 1 or 3; PP any split of the 30 layers.
LOAD_DIR=${LOAD_DIR:-"./model_from_hf/smollm2_135m_hf"}
SAVE_DIR=${SAVE_DIR:-"./model_weights/smollm2_135m_mcore"}
TP=${TP:-1}
PP=${PP:-1}
${PYTHON:-python} tools/convert_ckpt.py \
    --load-model-type hf --save-model-type mg \
    --model-type-hf llama \
    --target-tensor-parallel-size ${TP} --target-pipeline-parallel-size ${PP} \
    --load-dir ${LOAD_DIR} --save-dir ${SAVE_DIR} \
    --params-dtype fp32 "$@"
