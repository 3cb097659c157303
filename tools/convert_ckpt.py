"""Convert checkpoints between Hugging Face and mindlora's Megatron layout (MindSpeed-LLM flags).

    python tools/convert_ckpt.py --load-model-type hf --save-model-type mg \
        --load-dir ./qwen3_hf --save-dir ./qwen3_mcore --model-type-hf qwen3 \
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2

See docs/checkpoint.md for every mode (reshard, merge, PEFT export/import).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindlora.checkpoint.convert import ConvertOptions, convert  # noqa: E402
from mindlora.models.families import family_names  # noqa: E402
from mindlora.runtime.dtypes import SHORT_NAMES  # noqa: E402


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--num-layer-list {text!r}: expected e.g. 10,12,8")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-model-type", choices=("hf", "mg"), required=True)
    p.add_argument("--save-model-type", choices=("hf", "mg"), required=True)
    p.add_argument("--load-dir", help="HF model folder, or a mindlora / Megatron-LM / MindSpeed-LLM "
                                      "checkpoint to read")
    p.add_argument("--save-dir", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--model-type-hf", choices=family_names(),
                   help="model family (required for --load-model-type hf)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--target-expert-parallel-size", type=int, default=1,
                   help="mixture-of-experts models: split the routed experts over this many ranks")
    p.add_argument("--num-layer-list", type=_layer_list, default=None,
                   help="uneven pipeline split, layers per stage, e.g. 10,12,8")
    p.add_argument("--lora-load", help="adapter checkpoint (mindlora or MindSpeed-LLM LoRA) to merge "
                                       "or export")
    p.add_argument("--lora-r", type=int, help="checked against the adapter's own r")
    p.add_argument("--lora-alpha", type=float, help="checked against the adapter's own alpha")
    p.add_argument("--lora-target-modules", nargs="+",
                   help="checked against the adapter's own targets (names, all-linear or a regex)")
    p.add_argument("--save-lora-to-hf", action="store_true",
                   help="write --lora-load as an HF PEFT adapter into --save-dir")
    p.add_argument("--load-lora-from-hf", metavar="DIR",
                   help="import an HF PEFT adapter as a mindlora adapter checkpoint")
    p.add_argument("--params-dtype", choices=list(SHORT_NAMES), default=None,
                   help="cast floating tensors (default: keep the source dtype)")
    p.add_argument("--hf-cfg-dir", metavar="DIR",
                   help="HF model folder whose config.json completes a Megatron-LM / MindSpeed-LLM "
                        "checkpoint's args (rope scaling, true vocab size); its tokenizer files "
                        "are copied on mg -> hf")
    p.add_argument("--lora-key-style", choices=("mindlora", "mindspeed"), default="mindlora",
                   help="adapter keys on mg output: lora_A.weight or MindSpeed's "
                        "lora_A.default.weight")
    p.add_argument("--base-model-name-or-path",
                   help="adapter_config.json's base_model_name_or_path on --save-lora-to-hf "
                        "(default: config.json's _name_or_path, else the --load-dir folder name)")
    p.add_argument("--max-shard-size", default="5GB", help="HF output shard size (e.g. 2GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Accepted for MindSpeed-LLM launcher compatibility; mindlora derives these from config.json.
    for flag in ("--use-mcore-models", "--add-qkv-bias", "--qk-layernorm"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in ("--model-type", "--tokenizer-model", "--spec"):
        p.add_argument(flag, nargs="*", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = ConvertOptions(
        load_model_type=args.load_model_type, save_model_type=args.save_model_type,
        load_dir=args.load_dir, save_dir=args.save_dir, model_type_hf=args.model_type_hf,
        target_tensor_parallel_size=args.target_tensor_parallel_size,
        target_pipeline_parallel_size=args.target_pipeline_parallel_size,
        target_expert_parallel_size=args.target_expert_parallel_size,
        num_layer_list=args.num_layer_list, lora_load=args.lora_load, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_target_modules=args.lora_target_modules,
        save_lora_to_hf=args.save_lora_to_hf, load_lora_from_hf=args.load_lora_from_hf,
        params_dtype=args.params_dtype, max_shard_size=args.max_shard_size,
        progress=not args.no_progress, hf_cfg_dir=args.hf_cfg_dir,
        lora_key_style=args.lora_key_style, base_model_name_or_path=args.base_model_name_or_path)
    try:
        out = convert(opts)
    except (ValueError, FileNotFoundError) as e:
        print(f"convert_ckpt: error: {e}", file=sys.stderr)
        return 2
    print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
