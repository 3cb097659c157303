#!/bin/bash
# The quickstart's Alpaca records -> indexed instruction data (qwen3 template, no thinking).
INPUT=${INPUT:-"./quickstart_out/alpaca_add.json"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./quickstart_out/qwen3_tiny_hf"}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-"./quickstart_out/finetune_dataset/alpaca_add"}
mkdir -p "$(dirname "${OUTPUT_PREFIX}")"
${PYTHON:-python} tools/preprocess_data.py \
    --input ${INPUT} \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --output-prefix ${OUTPUT_PREFIX} \
    --handler-name AlpacaStyleInstructionHandler \
    --prompt-type qwen3 --enable-thinking false \
    --workers ${WORKERS:-1} --log-interval 256 "$@"
