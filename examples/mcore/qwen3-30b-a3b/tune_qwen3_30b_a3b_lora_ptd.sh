#!/bin/bash
# LoRA fine-tuning of Qwen3-30B-A3B (mixture of experts) with mindlora: LoRA on attention and on
# every expert's fc1/fc2, router frozen, load-balancing loss from config.json (logged apart as
# load_balancing_loss). Every variable can be overridden from the environment, e.g.
# `TP=2 EP=4 bash tune_qwen3_30b_a3b_lora_ptd.sh` (PRECISION= , empty, trains in fp32).
# World size must be a multiple of TP x PP x EP; MoE with TP > 1 needs --sequence-parallel
# (kept below). See docs/moe.md.
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-8}}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/qwen3_30b_a3b_mcore"}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/qwen3_30b_a3b_lora"}
DATA_PATH=${DATA_PATH:-"./finetune_dataset/alpaca/alpaca"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_30b_a3b_hf"}
TP=${TP:-2}
PP=${PP:-1}
EP=${EP:-4}
SEQ_LENGTH=${SEQ_LENGTH:-4096}
MBS=${MBS:-1}
GBS=${GBS:-64}
TRAIN_ITERS=${TRAIN_ITERS:-2000}

DISTRIBUTED_ARGS="--nproc-per-node $NPUS_PER_NODE --nnodes $NNODES --node-rank $NODE_RANK \
    --master-addr $MASTER_ADDR --master-port $MASTER_PORT"

GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --expert-model-parallel-size ${EP} \
    --sequence-parallel \
    --num-experts ${NUM_EXPERTS:-128} --moe-router-topk ${TOPK:-8} \
    --seq-length ${SEQ_LENGTH} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --train-iters ${TRAIN_ITERS} \
    --lr 1.25e-6 --min-lr 1.25e-7 --lr-decay-style cosine --lr-warmup-fraction 0.01 \
    --weight-decay 1e-1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 \
    --seed 42 ${PRECISION---bf16}
"
DATA_ARGS="
    --data-path ${DATA_PATH} \
    --split 100,0,0 \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --is-instruction-dataset --stage sft \
    --prompt-type qwen3
"
LORA_ARGS="
    --lora-r 16 --lora-alpha 32 \
    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2
"
OUTPUT_ARGS="
    --log-interval 1 --save-interval ${SAVE_INTERVAL:-500}
"

mkdir -p logs
torchrun $DISTRIBUTED_ARGS -m mindlora.train \
    $GPT_ARGS $DATA_ARGS $LORA_ARGS $OUTPUT_ARGS \
    --load ${CKPT_LOAD_DIR} --save ${CKPT_SAVE_DIR} \
    "$@" 2>&1 | tee logs/tune_qwen3_30b_a3b_lora_ptd.log
exit ${PIPESTATUS[0]}
