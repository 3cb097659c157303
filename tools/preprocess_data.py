"""Tokenise instruction or pre-training data into Megatron indexed datasets.

Same flags and output names as MindSpeed-LLM's tools/preprocess_data.py, e.g.::

    python tools/preprocess_data.py --input ./dataset/train-00000-of-00001.parquet \
        --tokenizer-name-or-path ./model_from_hf/qwen3_hf --output-prefix ./finetune_dataset/alpaca \
        --handler-name AlpacaStyleInstructionHandler --prompt-type qwen3 --workers 4

The logic lives in mindlora.data.preprocess; see docs/data.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindlora.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
