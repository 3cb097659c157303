"""``mindlora-convert`` / ``python tools/convert_ckpt.py``: the conversion command line.

    mindlora-convert --load-model-type hf --save-model-type mg \\
        --load-dir ./qwen3_hf --save-dir ./qwen3_mcore --model-type-hf qwen3 \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2

The flags are :class:`~mindlora.checkpoint.convert.ConvertOptions`' fields (MindSpeed-LLM
spelling); see docs/checkpoint.md for every mode (reshard, merge, PEFT export/import).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from mindlora.checkpoint.convert import ConvertOptions, convert
from mindlora.runtime.cli import Parser, option

_ORDER = ("load_model_type", "save_model_type", "load_dir", "save_dir", "model_type_hf",
          "target_tensor_parallel_size", "target_pipeline_parallel_size",
          "target_expert_parallel_size", "num_layer_list", "lora_load", "lora_r", "lora_alpha",
          "lora_target_modules", "save_lora_to_hf", "load_lora_from_hf", "params_dtype",
          "hf_cfg_dir", "lora_key_style", "base_model_name_or_path", "max_shard_size",
          "progress")


@dataclass
class LauncherFlags:
    """Accepted for MindSpeed-LLM launcher compatibility (hidden): mindlora derives these from
    config.json, so they change nothing."""

    use_mcore_models: bool = option(False, hidden=True)
    add_qkv_bias: bool = option(False, hidden=True)
    qk_layernorm: bool = option(False, hidden=True)
    model_type: Optional[list[str]] = option(None, nargs="*", hidden=True)
    tokenizer_model: Optional[list[str]] = option(None, nargs="*", hidden=True)
    spec: Optional[list[str]] = option(None, nargs="*", hidden=True)


def parser() -> Parser:
    """The conversion parser, built from ConvertOptions."""
    p = Parser("mindlora-convert", "Convert checkpoints between Hugging Face and mindlora's "
                                   "Megatron layout (MindSpeed-LLM flags).")
    p.add_fields(ConvertOptions, _ORDER)
    p.add_fields(LauncherFlags)
    return p


def parse_options(argv: Optional[Sequence[str]] = None) -> ConvertOptions:
    """Flags (and ``--config FILE.yaml``) -> ConvertOptions (validated by ``convert``)."""
    p = parser()
    return p.build(ConvertOptions, p.parse(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one conversion; a bad flag or input is one line on stderr and exit code 2."""
    try:
        out = convert(parse_options(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"convert_ckpt: error: {e}", file=sys.stderr)
        return 2
    print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
