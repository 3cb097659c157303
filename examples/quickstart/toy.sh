# Sourced by examples/quickstart.sh: the reduced, offline quickstart (CI runs it). A tiny random
# Qwen3 model, a locally trained tokenizer and addition records made on the spot; TP=2.
RUN_NAME=qwen3_tiny_lora
HF="$OUT/qwen3_tiny_hf"
MCORE="$OUT/qwen3_tiny_mcore"
ADAPTER="$OUT/ckpt/qwen3_tiny_lora"
PEFT="$OUT/qwen3_tiny_lora_peft"
PROMPT_TYPE=qwen3
THINKING=false
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-12}
TRAIN_LOG="$LOG_DIR/tune_tiny_lora_ptd.log"
CHECKS=()
LAUNCH=examples/mcore/tiny

assets() {
    python examples/quickstart/make_assets.py "$OUT"
    printf '%s\n' '{"prompt": "Add the two numbers.\n12 + 7"}' \
        '{"prompt": "Add the two numbers.\n30 + 4"}' > "$OUT/prompts.jsonl"
}
convert() {
    LOAD_DIR="$HF" SAVE_DIR="$MCORE" bash $LAUNCH/ckpt_convert_tiny_hf2mcore.sh --no-progress
}
preprocess() {
    INPUT="$OUT/alpaca_add.json" TOKENIZER_PATH="$HF" \
        OUTPUT_PREFIX="$OUT/finetune_dataset/alpaca_add" bash $LAUNCH/data_convert_tiny_instruction.sh
}
train() {
    CKPT_LOAD_DIR="$MCORE" CKPT_SAVE_DIR="$ADAPTER" TOKENIZER_PATH="$HF" \
        DATA_PATH="$OUT/finetune_dataset/alpaca_add" TRAIN_ITERS=${TRAIN_ITERS:-60} \
        LOG_DIR="$LOG_DIR" bash $LAUNCH/tune_tiny_lora_ptd.sh
}
