#!/bin/bash
# Alpaca-style records -> indexed instruction data for SmolLM2 (ChatML template, prompt masked).
INPUT=${INPUT:-"./dataset/alpaca_en_demo.json"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/smollm2_135m_hf"}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-"./finetune_dataset/alpaca_en_demo/alpaca"}
SEQ_LENGTH=${SEQ_LENGTH:-512}
mkdir -p "$(dirname "${OUTPUT_PREFIX}")"
${PYTHON:-python} tools/preprocess_data.py \
    --input ${INPUT} \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --output-prefix ${OUTPUT_PREFIX} \
    --handler-name AlpacaStyleInstructionHandler \
    --prompt-type chatml \
    --seq-length ${SEQ_LENGTH} --overlong truncate \
    --workers ${WORKERS:-1} --log-interval 500 "$@"
