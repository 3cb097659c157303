#!/bin/bash
# Alpaca (parquet/json/jsonl) -> indexed instruction data with the qwen3 chat template.
INPUT=${INPUT:-"./dataset/train-00000-of-00001-a09b74b3ef9c3b56.parquet"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/qwen3_30b_a3b_hf"}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-"./finetune_dataset/alpaca/alpaca"}
mkdir -p "$(dirname "${OUTPUT_PREFIX}")"
python tools/preprocess_data.py \
    --input ${INPUT} \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --output-prefix ${OUTPUT_PREFIX} \
    --handler-name AlpacaStyleInstructionHandler \
    --tokenizer-type PretrainedFromHF \
    --prompt-type qwen3 --enable-thinking ${ENABLE_THINKING:-none} \
    --workers ${WORKERS:-4} --log-interval 1000 "$@"
