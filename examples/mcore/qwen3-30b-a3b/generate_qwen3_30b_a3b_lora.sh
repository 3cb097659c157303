#!/bin/bash
# Generate with the converted Qwen3-30B-A3B and (optionally) a trained adapter.
# `PROMPTS=./prompts.jsonl LORA_LOAD=./ckpt/qwen3_30b_a3b_lora bash generate_qwen3_30b_a3b_lora.sh`
NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-8}}
MASTER_PORT=${MASTER_PORT:-6001}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/qwen3_30b_a3b_mcore"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_30b_a3b_hf"}
PROMPTS=${PROMPTS:-"./prompts.jsonl"}
TP=${TP:-2}
EP=${EP:-4}
LORA_ARGS=""
if [ -n "${LORA_LOAD}" ]; then LORA_ARGS="--lora-load ${LORA_LOAD}"; fi
torchrun --nproc-per-node $NPUS_PER_NODE --master-port $MASTER_PORT -m mindlora.generate \
    --load ${CKPT_LOAD_DIR} ${LORA_ARGS} \
    --tensor-model-parallel-size ${TP} --expert-model-parallel-size ${EP} \
    --tokenizer-name-or-path ${TOKENIZER_PATH} --prompt-type qwen3 \
    --prompts ${PROMPTS} --max-new-tokens ${MAX_NEW_TOKENS:-256} ${PRECISION---bf16} "$@"
