"""``mindlora.generate`` flags -> a small typed config.

The parallel flags are the training ones (``--tensor-model-parallel-size`` ...), so a tuning
launcher's layout can be reused; the architecture and LoRA shape come from the checkpoints.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mindlora.config import ParallelConfig, fail_if
from mindlora.data.templates import THINKING_MODES
from mindlora.generation.sampling import SamplingConfig
from mindlora.runtime.dtypes import from_flags


@dataclass
class GenerateConfig:
    """Everything one ``mindlora.generate`` run needs."""

    load: str
    """Base checkpoint (``tools/convert_ckpt.py`` output)."""
    tokenizer: str
    """Tokenizer folder or file (``--tokenizer-name-or-path``)."""
    prompt_type: str
    """Chat template name (``--prompt-type``)."""
    sampling: SamplingConfig
    parallel: ParallelConfig
    lora_load: Optional[str] = None
    """Adapter checkpoint; without it the base model alone answers."""
    lora_fusion: bool = False
    prompt_type_path: Optional[str] = None
    enable_thinking: str = "none"
    prompts: Optional[str] = None
    """JSONL file of prompts; None with ``interactive``."""
    interactive: bool = False
    output: Optional[str] = None
    """JSONL answers file; None = stdout."""
    micro_batch_size: int = 8
    """Prompts generated together."""
    dtype: torch.dtype = torch.float32


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mindlora.generate", allow_abbrev=False,
                                description="Generate answers with a base model and optionally "
                                            "a LoRA adapter (torchrun).")
    g = p.add_argument_group("model")
    g.add_argument("--load", required=True, help="base checkpoint directory")
    g.add_argument("--lora-load", default=None, help="adapter checkpoint directory")
    g.add_argument("--lora-fusion", action="store_true",
                   help="CCLoRA: under tensor parallelism, fold LoRA's communication into the "
                        "base layer's collectives (TP=1 always uses the fused kernel)")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g = p.add_argument_group("parallelism (as in training)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="mixture-of-experts models: routed experts split over this many ranks")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layer-list", type=str, default=None, help="e.g. 10,12,8")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="accepted; generation runs without it (same weights, same results)")
    g = p.add_argument_group("prompts")
    g.add_argument("--tokenizer-name-or-path", required=True)
    g.add_argument("--prompt-type", required=True, help="template name in templates.json")
    g.add_argument("--prompt-type-path", default=None, help="another templates.json")
    g.add_argument("--enable-thinking", default="none", type=str.lower, choices=THINKING_MODES)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", default=None, help='JSONL: {"prompt": ...} or {"messages": ...}')
    src.add_argument("--interactive", action="store_true", help="chat in the terminal")
    g.add_argument("--output", default=None, help="answers JSONL (default: stdout)")
    g.add_argument("--micro-batch-size", type=int, default=8, help="prompts generated together")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=1234)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> GenerateConfig:
    """Parse flags into a validated :class:`GenerateConfig` (ValueError naming every problem)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    errors = []
    if unknown:
        errors.append(f"unknown flag(s): {' '.join(unknown)} (see python -m mindlora.generate "
                      f"--help)")
    if ns.bf16 and ns.fp16:
        errors.append("--bf16 and --fp16 are mutually exclusive")
    if ns.micro_batch_size < 1:
        errors.append(f"--micro-batch-size ({ns.micro_batch_size}) must be >= 1")
    if ns.lora_fusion and not ns.lora_load:
        errors.append("--lora-fusion needs --lora-load (it changes how LoRA layers communicate)")
    if ns.interactive and ns.output:
        errors.append("--output goes with --prompts; --interactive prints to the terminal")
    fail_if(errors, "flags")
    sampling = SamplingConfig(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                              top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed)
    parallel = ParallelConfig(
        tensor_model_parallel_size=ns.tensor_model_parallel_size,
        pipeline_model_parallel_size=ns.pipeline_model_parallel_size,
        sequence_parallel=ns.sequence_parallel,
        expert_model_parallel_size=ns.expert_model_parallel_size,
        num_layer_list=([int(x) for x in ns.num_layer_list.split(",")]
                        if ns.num_layer_list else None))
    dtype = from_flags(ns.bf16, ns.fp16)
    return GenerateConfig(
        load=ns.load, tokenizer=ns.tokenizer_name_or_path, prompt_type=ns.prompt_type,
        sampling=sampling, parallel=parallel, lora_load=ns.lora_load, lora_fusion=ns.lora_fusion,
        prompt_type_path=ns.prompt_type_path, enable_thinking=ns.enable_thinking,
        prompts=ns.prompts, interactive=ns.interactive, output=ns.output,
        micro_batch_size=ns.micro_batch_size, dtype=dtype)
