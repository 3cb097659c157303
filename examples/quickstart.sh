#!/usr/bin/env bash
# mindlora end to end on a laptop CPU, nothing downloaded (about 2-3 minutes on 2 cores):
#   1. make a tokenizer, a small Qwen3-style HF model and Alpaca data locally
#   2. HF -> mindlora/Megatron weights (TP=2)          tools/convert_ckpt.py
#   3. Alpaca -> indexed instruction data (qwen3)     tools/preprocess_data.py
#   4. LoRA fine-tuning, 2 processes, TP=2, gloo      torchrun -m mindlora.train
#   5. adapter -> HF PEFT format, loaded by peft.PeftModel and checked against mindlora
# Outputs go to ./quickstart_out (recreated on each run); logs to ./logs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH" PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=quickstart_out
rm -rf "$OUT"

echo "== 1/5 local assets"
python examples/quickstart/make_assets.py "$OUT"
echo "== 2/5 convert HF -> mcore (TP=2)"
bash examples/mcore/tiny/ckpt_convert_tiny_hf2mcore.sh --no-progress
echo "== 3/5 preprocess Alpaca data"
bash examples/mcore/tiny/data_convert_tiny_instruction.sh
echo "== 4/5 LoRA fine-tuning (torchrun, 2 CPU processes)"
MASTER_PORT=${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')} \
    bash examples/mcore/tiny/tune_tiny_lora_ptd.sh
echo "== 5/5 export the adapter to HF PEFT and check it"
python tools/convert_ckpt.py --load-model-type mg --save-model-type hf \
    --load-dir "$OUT/qwen3_tiny_mcore" --lora-load "$OUT/ckpt/qwen3_tiny_lora" \
    --save-lora-to-hf --save-dir "$OUT/peft_adapter" --no-progress
python examples/quickstart/check_peft.py "$OUT"
echo "quickstart done: adapter in $OUT/ckpt/qwen3_tiny_lora, PEFT export in $OUT/peft_adapter"
