#!/bin/bash
# Answers from the quickstart's tiny Qwen3 + its adapter on CPU: 2 processes, TP=2, gloo.
# Every variable below can be overridden from the environment. LORA_LOAD_DIR="" answers with the
# base model alone (compare the two); PROMPTS="" starts an interactive chat instead of a JSONL run.
# TP/PP need not match the checkpoints: base and adapter are resharded at load time.
NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-2}}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./quickstart_out/qwen3_tiny_mcore"}
LORA_LOAD_DIR=${LORA_LOAD_DIR-"./quickstart_out/ckpt/qwen3_tiny_lora"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./quickstart_out/qwen3_tiny_hf"}
PROMPT_TYPE=${PROMPT_TYPE:-qwen3}
PROMPTS=${PROMPTS-""}
OUTPUT=${OUTPUT-""}
TP=${TP:-2}
PP=${PP:-1}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}

DISTRIBUTED_ARGS="--nproc-per-node $NPUS_PER_NODE --nnodes $NNODES --node-rank $NODE_RANK \
    --master-addr $MASTER_ADDR --master-port $MASTER_PORT"

MODEL_ARGS="
    --load ${CKPT_LOAD_DIR} \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --prompt-type ${PROMPT_TYPE}
"
GENERATE_ARGS="
    --max-new-tokens ${MAX_NEW_TOKENS} \
    --temperature ${TEMPERATURE:-0} --top-p ${TOP_P:-1.0} --top-k ${TOP_K:-0} --seed 1234
"
[ -n "${LORA_LOAD_DIR}" ] && MODEL_ARGS="${MODEL_ARGS} --lora-load ${LORA_LOAD_DIR}"
if [ -n "${PROMPTS}" ]; then
    IO_ARGS="--prompts ${PROMPTS}"
    [ -n "${OUTPUT}" ] && IO_ARGS="${IO_ARGS} --output ${OUTPUT}"
else
    IO_ARGS="--interactive"
fi

${TORCHRUN:-torchrun} $DISTRIBUTED_ARGS -m mindlora.generate \
    $MODEL_ARGS $GENERATE_ARGS $IO_ARGS "$@"
