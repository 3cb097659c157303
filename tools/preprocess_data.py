"""Tokenise instruction or pre-training data into Megatron indexed datasets.

Same flags and output names as MindSpeed-LLM's tools/preprocess_data.py, e.g.::

    python tools/preprocess_data.py --input ./dataset/train-00000-of-00001.parquet \
        --tokenizer-name-or-path ./model_from_hf/qwen3_hf --output-prefix ./finetune_dataset/alpaca \
        --handler-name AlpacaStyleInstructionHandler --prompt-type qwen3 --workers 4

The same as the ``mindlora-preprocess`` console script; the command line lives in
mindlora.data.cli, the run in mindlora.data.preprocess; see docs/data.md.
"""
import sys

from mindlora.data.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
