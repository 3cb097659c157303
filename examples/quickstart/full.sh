# Sourced by examples/quickstart.sh: the full quickstart's stages (SmolLM2-135M-Instruct learns
# to introduce itself as MindLoRA from LLaMA-Factory's identity data blended with Alpaca data).
CACHE=${MINDLORA_CACHE:-$HOME/.cache/mindlora}
RUN_NAME=smollm2_135m_lora
MCORE="$OUT/smollm2_135m_mcore"
ADAPTER="$OUT/ckpt/smollm2_135m_lora"
PEFT="$OUT/smollm2_135m_lora_peft"
PROMPT_TYPE=chatml
THINKING=none
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-40}
TRAIN_LOG="$LOG_DIR/tune_smollm2_135m_lora_ptd.log"
CHECKS=(--learned "Who are you?=>MindLoRA" --kept "What is the capital of France?=>Paris")
LAUNCH=examples/mcore/smollm2-135m

assets() {
    python examples/quickstart/fetch_assets.py --cache "$CACHE" | tee "$OUT/assets.env"
    HF=$(sed -n 's/^MODEL_HF=//p' "$OUT/assets.env")
    DATA=$(sed -n 's/^DATA_DIR=//p' "$OUT/assets.env")
    python examples/quickstart/make_identity.py "$DATA/identity.json" \
        "$OUT/dataset/identity_mindlora.json" --name MindLoRA --author "the mindlora team"
    printf '%s\n' '{"prompt": "Who are you?"}' '{"prompt": "What is the capital of France?"}' \
        '{"prompt": "Give three tips for staying healthy."}' > "$OUT/prompts.jsonl"
}
convert() {
    LOAD_DIR="$HF" SAVE_DIR="$MCORE" bash $LAUNCH/ckpt_convert_smollm2_135m_hf2mcore.sh
}
preprocess() {
    INPUT="$OUT/dataset/identity_mindlora.json" TOKENIZER_PATH="$HF" \
        OUTPUT_PREFIX="$OUT/finetune_dataset/identity" SEQ_LENGTH=256 \
        bash $LAUNCH/data_convert_smollm2_135m_instruction.sh
    INPUT="$DATA/alpaca_en_demo.json" TOKENIZER_PATH="$HF" \
        OUTPUT_PREFIX="$OUT/finetune_dataset/alpaca_en_demo" SEQ_LENGTH=256 \
        bash $LAUNCH/data_convert_smollm2_135m_instruction.sh
}
train() {  # data parallel over 2 CPU processes; Megatron-style blend of the two datasets
    CKPT_LOAD_DIR="$MCORE" CKPT_SAVE_DIR="$ADAPTER" TOKENIZER_PATH="$HF" LOG_DIR="$LOG_DIR" \
        DATA_PATH="0.3 $OUT/finetune_dataset/identity 0.7 $OUT/finetune_dataset/alpaca_en_demo" \
        NPUS_PER_NODE=2 TP=1 PP=1 SEQ_LENGTH=256 MBS=1 GBS=8 TRAIN_ITERS=${TRAIN_ITERS:-60} \
        LR=1e-3 LORA_R=8 bash $LAUNCH/tune_smollm2_135m_lora_ptd.sh
}
