"""Convert checkpoints between Hugging Face and mindlora's Megatron layout (MindSpeed-LLM flags).

    python tools/convert_ckpt.py --load-model-type hf --save-model-type mg \
        --load-dir ./qwen3_hf --save-dir ./qwen3_mcore --model-type-hf qwen3 \
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2

The same as the ``mindlora-convert`` console script; the command line lives in
mindlora.checkpoint.cli. See docs/checkpoint.md for every mode (reshard, merge, PEFT export/import).
"""
import sys

from mindlora.checkpoint.cli import main, parser

__all__ = ["main", "parser"]

if __name__ == "__main__":
    sys.exit(main())
