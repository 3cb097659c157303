"""``mindlora-preprocess`` / ``python tools/preprocess_data.py``: the preprocessing command line.

Same flags and output names as MindSpeed-LLM's tools/preprocess_data.py, e.g.::

    mindlora-preprocess --input ./dataset/train-00000-of-00001.parquet \\
        --tokenizer-name-or-path ./model_from_hf/qwen3_hf --output-prefix ./finetune_dataset/alpaca \\
        --handler-name AlpacaStyleInstructionHandler --prompt-type qwen3 --workers 4

The flags are :class:`~mindlora.data.preprocess.PreprocessConfig`'s fields plus three accepted
for MindSpeed compatibility; the run itself is :func:`~mindlora.data.preprocess.run_preprocess`.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from mindlora.data.preprocess import PreprocessConfig, run_preprocess
from mindlora.data.tokenizer import TOKENIZER_TYPES
from mindlora.runtime.cli import Parser, option

log = logging.getLogger("mindlora.data")


@dataclass
class MindSpeedFlags:
    """MindSpeed-LLM preprocessing flags with no field of their own."""

    tokenizer_type: str = option("auto", choices=TOKENIZER_TYPES)
    """Accepted for MindSpeed compatibility; the kind is detected from files."""
    tokenizer_not_use_fast: bool = False
    """Accepted for MindSpeed compatibility; fast tokenizers are always used."""
    neat_pack: bool = False
    """MindSpeed alias: --pack with over-long samples truncated."""


def build_parser() -> Parser:
    """The preprocessing parser; flag names follow MindSpeed-LLM."""
    p = Parser("mindlora-preprocess", "Tokenise instruction / pretraining data into Megatron "
                                      "indexed datasets (.bin/.idx).")
    p.add_fields(PreprocessConfig, ("input", "tokenizer_name_or_path"))
    p.add_fields(MindSpeedFlags, ("tokenizer_type", "tokenizer_not_use_fast"))
    p.add_fields(PreprocessConfig, ("output_prefix", "handler_name", "prompt_type",
                                    "prompt_type_path", "enable_thinking", "seq_length", "pack"))
    p.add_fields(MindSpeedFlags, ("neat_pack",))
    p.add_fields(PreprocessConfig, ("overlong", "map_keys", "json_keys", "workers",
                                    "log_interval", "append_eod", "train_on_inputs",
                                    "mask_history", "skip_invalid"))
    return p


def config_from_args(argv: Optional[Sequence[str]] = None) -> PreprocessConfig:
    """Parse the command line (and ``--config FILE.yaml``) into a validated PreprocessConfig."""
    p = build_parser()
    ns = p.parse(argv)
    return p.build(PreprocessConfig, ns, pack=ns.pack or ns.neat_pack,
                   overlong="truncate" if ns.neat_pack else ns.overlong)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry: configure logging, run, map user errors to exit code 1 with one message."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        run_preprocess(config_from_args(argv))
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
