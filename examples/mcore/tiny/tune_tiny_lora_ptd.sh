#!/bin/bash
# LoRA fine-tuning of the quickstart's tiny Qwen3 on CPU: 2 processes, TP=2, gloo.
# The same launcher shape as examples/mcore/qwen3-8b/tune_qwen3_8b_lora_ptd.sh.
NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-2}}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./quickstart_out/qwen3_tiny_mcore"}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./quickstart_out/ckpt/qwen3_tiny_lora"}
DATA_PATH=${DATA_PATH:-"./quickstart_out/finetune_dataset/alpaca_add"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./quickstart_out/qwen3_tiny_hf"}
TP=${TP:-2}
PP=${PP:-1}
TRAIN_ITERS=${TRAIN_ITERS:-60}

DISTRIBUTED_ARGS="--nproc-per-node $NPUS_PER_NODE --nnodes $NNODES --node-rank $NODE_RANK \
    --master-addr $MASTER_ADDR --master-port $MASTER_PORT"

GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --seq-length 128 \
    --micro-batch-size 8 \
    --global-batch-size 16 \
    --train-iters ${TRAIN_ITERS} \
    --lr 5e-3 --min-lr 5e-4 --lr-decay-style cosine --lr-warmup-iters 5 \
    --weight-decay 0.0 --clip-grad 1.0 --seed 1234
"
DATA_ARGS="
    --data-path ${DATA_PATH} \
    --split 95,5,0 \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --is-instruction-dataset --stage sft --prompt-type qwen3 \
    --no-pad-to-seq-lengths --pad-to-multiple-of 8
"
LORA_ARGS="
    --lora-r 16 --lora-alpha 32 \
    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2
"
OUTPUT_ARGS="
    --log-interval 10 --save-interval 30 --eval-interval 30 --eval-iters 1
"

LOG_DIR=${LOG_DIR:-"./logs"}
mkdir -p "${LOG_DIR}"
${TORCHRUN:-torchrun} $DISTRIBUTED_ARGS -m mindlora.train \
    $GPT_ARGS $DATA_ARGS $LORA_ARGS $OUTPUT_ARGS \
    --load ${CKPT_LOAD_DIR} --save ${CKPT_SAVE_DIR} \
    "$@" 2>&1 | tee "${LOG_DIR}/tune_tiny_lora_ptd.log"
exit ${PIPESTATUS[0]}
