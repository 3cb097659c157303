#!/bin/bash
# LoRA fine-tuning of SmolLM2-135M-Instruct: by default 2 processes, data parallel (DP=2), which
# on a CPU means gloo and one core per process. Every variable below can be overridden from the
# environment (e.g. `PP=2 bash ...`, or NNODES/NODE_RANK/MASTER_ADDR for several nodes).
# DATA_PATH may blend datasets Megatron-style: "0.3 prefixA 0.7 prefixB".
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-2}}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/smollm2_135m_mcore"}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/smollm2_135m_lora"}
DATA_PATH=${DATA_PATH:-"./finetune_dataset/alpaca_en_demo/alpaca"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/smollm2_135m_hf"}
LOG_DIR=${LOG_DIR:-"./logs"}
TP=${TP:-1}
PP=${PP:-1}
SEQ_LENGTH=${SEQ_LENGTH:-256}
MBS=${MBS:-1}
GBS=${GBS:-8}
TRAIN_ITERS=${TRAIN_ITERS:-60}
LR=${LR:-1e-3}
LORA_R=${LORA_R:-8}

DISTRIBUTED_ARGS="--nproc-per-node $NPUS_PER_NODE --nnodes $NNODES --node-rank $NODE_RANK \
    --master-addr $MASTER_ADDR --master-port $MASTER_PORT"

GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --seq-length ${SEQ_LENGTH} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --train-iters ${TRAIN_ITERS} \
    --lr ${LR} --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 3 \
    --weight-decay 0.0 --clip-grad 1.0 --seed 1234
"
DATA_ARGS="
    --data-path ${DATA_PATH} \
    --split 100,0,0 \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --is-instruction-dataset --stage sft --prompt-type chatml \
    --no-pad-to-seq-lengths --pad-to-multiple-of 8
"
LORA_ARGS="
    --lora-r ${LORA_R} --lora-alpha $((LORA_R * 2)) \
    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2
"
OUTPUT_ARGS="
    --log-interval 1 --save-interval ${TRAIN_ITERS}
"

mkdir -p "${LOG_DIR}"
${TORCHRUN:-torchrun} $DISTRIBUTED_ARGS -m mindlora.train \
    $GPT_ARGS $DATA_ARGS $LORA_ARGS $OUTPUT_ARGS \
    --load ${CKPT_LOAD_DIR} --save ${CKPT_SAVE_DIR} \
    "$@" 2>&1 | tee "${LOG_DIR}/tune_smollm2_135m_lora_ptd.log"
exit ${PIPESTATUS[0]}
