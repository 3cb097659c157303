#!/bin/bash
# LoRA fine-tuning of Llama-3-8B with mindlora (single or multi node; every variable below can be
# overridden from the environment, e.g. `TP=2 PP=4 bash tune_llama3_8b_lora_ptd.sh`).
# TP/PP need not match the converted checkpoint: the base is resharded at load time.
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-8}}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/llama3_8b_mcore"}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/llama3_8b_lora"}
DATA_PATH=${DATA_PATH:-"./finetune_dataset/alpaca/alpaca"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/llama3_8b_hf"}
TP=${TP:-2}
PP=${PP:-2}
SEQ_LENGTH=${SEQ_LENGTH:-8192}
MBS=${MBS:-1}
GBS=${GBS:-64}
TRAIN_ITERS=${TRAIN_ITERS:-2000}

DISTRIBUTED_ARGS="--nproc-per-node $NPUS_PER_NODE --nnodes $NNODES --node-rank $NODE_RANK \
    --master-addr $MASTER_ADDR --master-port $MASTER_PORT"

GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --sequence-parallel \
    --seq-length ${SEQ_LENGTH} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --train-iters ${TRAIN_ITERS} \
    --lr 1.25e-6 --min-lr 1.25e-7 --lr-decay-style cosine --lr-warmup-fraction 0.01 \
    --weight-decay 1e-1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 \
    --seed 42 --bf16
"
DATA_ARGS="
    --data-path ${DATA_PATH} \
    --split 100,0,0 \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --is-instruction-dataset --stage sft \
    --prompt-type llama3 \
    --no-pad-to-seq-lengths --pad-to-multiple-of 8
"
LORA_ARGS="
    --lora-r 16 --lora-alpha 32 \
    --lora-fusion \
    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2
"
OUTPUT_ARGS="
    --log-interval 1 --save-interval ${SAVE_INTERVAL:-500}
"

mkdir -p logs
torchrun $DISTRIBUTED_ARGS -m mindlora.train \
    $GPT_ARGS $DATA_ARGS $LORA_ARGS $OUTPUT_ARGS \
    --load ${CKPT_LOAD_DIR} --save ${CKPT_SAVE_DIR} \
    "$@" 2>&1 | tee logs/tune_llama3_8b_lora_ptd.log
exit ${PIPESTATUS[0]}
