"""``mindlora.generate`` flags (and ``--config FILE.yaml``) -> a small typed config.

The parallel flags are the training ones (``--tensor-model-parallel-size`` ...), so a tuning
launcher's layout can be reused; the architecture and LoRA shape come from the checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mindlora.config import ParallelConfig, fail_if
from mindlora.data.templates import THINKING_MODES
from mindlora.generation.sampling import SamplingConfig
from mindlora.runtime.cli import PARALLEL_OPTIONS, Parser, option
from mindlora.runtime.dtypes import from_flags


@dataclass
class GenerateConfig:
    """Everything one ``mindlora.generate`` run needs; its fields (and SamplingConfig's and
    ParallelConfig's) are the flags."""

    load: str = option(help="base checkpoint directory")
    """Base checkpoint (``tools/convert_ckpt.py`` output)."""
    tokenizer: str = option(flag="--tokenizer-name-or-path")
    """Tokenizer folder or file."""
    prompt_type: str = option(help="template name in templates.json")
    """Chat template name."""
    sampling: SamplingConfig = option(cli=False)
    parallel: ParallelConfig = option(cli=False)
    lora_load: Optional[str] = option(None, help="adapter checkpoint directory")
    """Adapter checkpoint; without it the base model alone answers."""
    lora_fusion: bool = False
    """CCLoRA: under tensor parallelism, fold LoRA's communication into the base layer's
    collectives (TP=1 always uses the fused kernel)."""
    bf16: bool = False
    """Hold the model in bfloat16."""
    fp16: bool = False
    """Hold the model in float16."""
    prompt_type_path: Optional[str] = None
    """Another templates.json."""
    enable_thinking: str = option("none", type=str.lower, choices=THINKING_MODES)
    """Reasoning templates: true / false / none (the template's default)."""
    prompts: Optional[str] = option(None, help='JSONL: {"prompt": ...} or {"messages": ...}')
    """JSONL file of prompts; None with ``interactive``."""
    interactive: bool = False
    """Chat in the terminal."""
    output: Optional[str] = None
    """Answers JSONL (default: stdout)."""
    micro_batch_size: int = option(8, help="prompts generated together")
    """Prompts generated together."""

    @property
    def dtype(self) -> torch.dtype:
        """The parameter dtype ``--bf16`` / ``--fp16`` ask for (neither: float32)."""
        return from_flags(self.bf16, self.fp16)


_PARALLEL = {**PARALLEL_OPTIONS,
             "sequence_parallel": {"help": "accepted; generation runs without it (same weights, "
                                           "same results)"}}


def build_parser() -> Parser:
    p = Parser("mindlora.generate", "Generate answers with a base model and optionally a LoRA "
                                    "adapter (torchrun).")
    p.add_fields(GenerateConfig, ("load", "lora_load", "lora_fusion", "bf16", "fp16"),
                 group=p.add_argument_group("model"))
    p.add_fields(ParallelConfig, ("tensor_model_parallel_size", "expert_model_parallel_size",
                                  "pipeline_model_parallel_size", "num_layer_list",
                                  "sequence_parallel"),
                 group=p.add_argument_group("parallelism (as in training)"), overrides=_PARALLEL)
    g = p.add_argument_group("prompts")
    p.add_fields(GenerateConfig, ("tokenizer", "prompt_type", "prompt_type_path",
                                  "enable_thinking"), group=g)
    p.add_fields(GenerateConfig, ("prompts", "interactive"),
                 group=g.add_mutually_exclusive_group(required=True))
    p.add_fields(GenerateConfig, ("output", "micro_batch_size"), group=g)
    p.add_fields(SamplingConfig, ("max_new_tokens", "temperature", "top_p", "top_k", "seed"),
                 group=p.add_argument_group("sampling"))
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> GenerateConfig:
    """Parse flags (and ``--config FILE.yaml``) into a validated :class:`GenerateConfig`
    (ValueError naming every problem)."""
    p = build_parser()
    ns = p.parse(argv)
    errors = []
    if ns.bf16 and ns.fp16:
        errors.append("--bf16 and --fp16 are mutually exclusive")
    if ns.micro_batch_size < 1:
        errors.append(f"--micro-batch-size ({ns.micro_batch_size}) must be >= 1")
    if ns.lora_fusion and not ns.lora_load:
        errors.append("--lora-fusion needs --lora-load (it changes how LoRA layers communicate)")
    if ns.interactive and ns.output:
        errors.append("--output goes with --prompts; --interactive prints to the terminal")
    fail_if(errors, "flags")
    return p.build(GenerateConfig, ns, sampling=p.build(SamplingConfig, ns),
                   parallel=p.build(ParallelConfig, ns))
