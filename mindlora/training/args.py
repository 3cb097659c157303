"""Megatron-style command-line flags (and ``--config FILE.yaml``) -> small typed configs.

The flags are the ones MindSpeed-LLM / Megatron-LM users already type, built from the fields of
the configs below (mindlora.runtime.cli: name, type, default, choices, help from the field's
docstring). A YAML file goes through the same parser: each key (a flag name, dashes or
underscores) becomes ``--flag=value``, so it gets the flag's type and choices (``lr: 1e-4``, which
PyYAML reads as a string, is a float), and the command line, parsed after it, wins. Unknown flags
or keys, bad values and flags that contradict each other fail at once naming them (and the file).
Architecture flags (``--num-layers`` ...) are optional: the architecture comes from the
checkpoint, and any such flag given is checked against it. Megatron flags mindlora does not
implement are refused by name (``megatron_flags.py``).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from mindlora.config import LORA_TARGETS, LoRAConfig, ParallelConfig, fail_if
from mindlora.data.tokenizer import TOKENIZER_TYPES
from mindlora.runtime.cli import PARALLEL_OPTIONS, Parser, option
from mindlora.training import megatron_flags


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision and checkpoint settings of one run."""

    micro_batch_size: int = 1
    """Samples per micro-batch on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per iteration over all data-parallel ranks (gradient accumulation fills it)."""
    seq_length: int = 1024
    """Tokens per sample (padded or cut to it)."""
    train_iters: int = 100
    """Iterations to train."""
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_decay_style: str = option("cosine", choices=("cosine", "linear", "constant"))
    """Learning-rate decay after warm-up."""
    lr_warmup_fraction: Optional[float] = None
    """Warm-up as a fraction of --train-iters (instead of --lr-warmup-iters)."""
    lr_warmup_iters: int = 0
    """Warm-up iterations (linear from 0)."""
    lr_decay_iters: Optional[int] = None
    """Iterations over which the rate decays (default: --train-iters)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA factors."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    bf16: bool = False
    """Hold the model in bfloat16."""
    fp16: bool = False
    """Hold the model in float16 (with loss scaling, see --initial-loss-scale)."""
    initial_loss_scale: float = 2.0 ** 16
    """Starting loss scale with --fp16."""
    seed: int = 1234
    """Seed of LoRA init, dropout and data order."""
    load: Optional[str] = None
    """Base model: a mindlora/Megatron checkpoint directory (``convert_ckpt.py`` output)."""
    save: Optional[str] = None
    """Folder for adapter checkpoints."""
    save_interval: Optional[int] = None
    """Save every N iterations (and at the end)."""
    lora_load: Optional[str] = None
    """Adapter checkpoint to resume from (or to start from, with ``--finetune``)."""
    finetune: bool = False
    """Load adapter weights only: reset iteration, optimizer and data position."""
    log_interval: int = 1
    """A log line every N iterations."""
    eval_interval: Optional[int] = None
    """Validate every N iterations."""
    eval_iters: int = 0
    """Validation batches per evaluation."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars here."""
    recompute_granularity: Optional[str] = option(None, choices=("full", "selective"))
    """Activation recomputation: full layers or the attention core only."""
    recompute_method: Optional[str] = option(None, choices=("uniform", "block"))
    """With full recomputation: how layers are chosen."""
    recompute_num_layers: Optional[int] = None
    """With full recomputation: layers per group (uniform) or per stage (block)."""
    max_nan_iterations: int = 10
    """Stop after this many consecutive skipped (NaN/Inf) iterations."""
    eval_prompts: Optional[str] = None
    """Prompts (one a line, or JSONL) answered greedily every ``--eval-interval``."""
    eval_max_new_tokens: int = 64
    """Tokens generated per answer for --eval-prompts."""
    exit_interval: Optional[int] = None
    """Save and stop at the first iteration divisible by this (Megatron's ``--exit-interval``)."""
    exit_duration_in_mins: Optional[float] = None
    """Save and stop after the first iteration ending this many minutes after start-up."""
    exit_signal_handler: bool = False
    """On SIGTERM finish the current iteration, save and exit 0 (a preempted cluster job)."""
    save_total_limit: Optional[int] = None
    """Keep only the newest N checkpoints in ``--save`` (never removing the one the tracker names)."""
    no_load_optim: bool = False
    """On resume, do not restore the optimizer and loss-scaler state (fresh AdamW moments)."""
    no_load_rng: bool = False
    """On resume, do not restore the RNG states (dropout masks follow ``--seed`` instead)."""
    distributed_backend: Optional[str] = option(None, choices=("nccl", "hccl", "gloo"))
    """Checked against the backend the device implies (cuda: nccl, npu: hccl, cpu: gloo)."""


@dataclass
class DataConfig:
    """Where the preprocessed data lives and how batches are padded."""

    data_path: list[str] = field(default_factory=list)
    """Prefix, or ``W1 P1 W2 P2 ...`` weighted blend of prefixes."""
    split: str = "100,0,0"
    """Train,validation,test weights of the samples."""
    tokenizer_name_or_path: Optional[str] = None
    """Tokenizer: checked against the one the data was preprocessed with; used by --eval-prompts."""
    is_instruction_dataset: bool = option(True, cli=False)
    prompt_type: Optional[str] = None
    """Checked against the template the data was preprocessed with."""
    pad_to_seq_lengths: bool = option(True, flag="--no-pad-to-seq-lengths",
                                      help="pad each batch to its longest sample, not to "
                                           "--seq-length")
    """Pad every batch to ``--seq-length`` (``--no-pad-to-seq-lengths``: to its longest)."""
    pad_to_multiple_of: int = 8
    """Pad batch lengths to a multiple of this (what --no-pad-to-seq-lengths pads to)."""


@dataclass
class OtherFlags:
    """Flags that fill no config field: Megatron launcher flags with no effect here (or only one
    accepted value), and the virtual pipeline size (an architecture override)."""

    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Interleaved 1F1B: layers per virtual pipeline stage."""
    transformer_impl: Optional[str] = option(
        None, help="local (the only one: megatron-core's local layers with LoRA); "
                   "transformer_engine is refused")
    tokenizer_type: Optional[str] = option(
        None, choices=TOKENIZER_TYPES,
        help="no effect: the tokenizer kind is detected from its files")
    is_instruction_dataset: bool = option(
        False, help="no effect: training data is always instruction data (labels masked)")
    stage: Optional[str] = option(None, choices=("sft",))


@dataclass
class ArchChecks:
    """Architecture flags (optional; the checkpoint is the source, each is checked against it).
    Field names are ModelConfig's."""

    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    kv_channels: Optional[int] = None
    padded_vocab_size: Optional[int] = None
    num_moe_experts: Optional[int] = option(None, flag="--num-experts")
    moe_router_topk: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    rotary_base: Optional[float] = None
    norm_epsilon: Optional[float] = None
    moe_aux_loss_coeff: Optional[float] = None
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = False


@dataclass
class RunConfig:
    """Everything a training run needs, parsed and validated."""

    train: TrainConfig
    data: DataConfig
    lora: LoRAConfig
    parallel: ParallelConfig
    arch_overrides: dict[str, Any]
    """ModelConfig field -> value a flag claims (checked against the checkpoint), plus
    ``num_layers_per_virtual_pipeline_stage`` and ``padded_vocab_size``."""


ARCH_FLAGS = {("tie_word_embeddings" if f.name == "untie_embeddings_and_output_weights"
               else f.name): f.metadata.get("cli", {}).get("flag", "--" + f.name.replace("_", "-"))
              for f in dataclasses.fields(ArchChecks)}
"""Architecture flag of each checked ModelConfig field (add_qkv_bias, qk_layernorm and
tie_word_embeddings are switches)."""

_GROUPS = (  # (title, config, fields), in --help order
    ("parallelism", ParallelConfig, ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                     "num_layer_list")),
    ("parallelism", OtherFlags, ("num_layers_per_virtual_pipeline_stage",)),
    ("parallelism", ParallelConfig, ("sequence_parallel", "expert_model_parallel_size",
                                     "expert_tensor_parallel_size")),
    ("batch and schedule", TrainConfig, (
        "micro_batch_size", "global_batch_size", "seq_length", "train_iters", "lr", "min_lr",
        "lr_warmup_fraction", "lr_warmup_iters", "lr_decay_iters", "weight_decay", "clip_grad",
        "adam_beta1", "adam_beta2", "adam_eps", "seed", "initial_loss_scale", "log_interval",
        "save_interval", "eval_interval", "eval_iters", "exit_duration_in_mins",
        "save_total_limit", "max_nan_iterations", "exit_interval", "eval_max_new_tokens",
        "recompute_num_layers", "lr_decay_style", "recompute_granularity", "recompute_method",
        "bf16", "fp16")),
    ("batch and schedule", OtherFlags, ("transformer_impl",)),
    ("checkpoints and logging", TrainConfig, (
        "load", "save", "lora_load", "tensorboard_dir", "eval_prompts", "finetune",
        "no_load_optim", "no_load_rng", "exit_signal_handler", "distributed_backend")),
    ("LoRA", LoRAConfig, ("r", "alpha", "dropout", "target_modules", "use_rslora", "init_a",
                          "fold_collectives")),
    ("data", DataConfig, ("data_path", "split", "tokenizer_name_or_path")),
    ("data", OtherFlags, ("tokenizer_type", "is_instruction_dataset")),
    ("data", DataConfig, ("prompt_type",)),
    ("data", OtherFlags, ("stage",)),
    ("data", DataConfig, ("pad_to_seq_lengths", "pad_to_multiple_of")),
    ("architecture checks (optional; the checkpoint is the source)", ArchChecks, None),
)
_OVERRIDES = {
    ParallelConfig: {**PARALLEL_OPTIONS,
                     "expert_tensor_parallel_size": {
                         "help": "mixture-of-experts models: must equal "
                                 "--tensor-model-parallel-size (experts are split over the "
                                 "attention TP group); another value is refused"}},
    LoRAConfig: {"target_modules": {
        "help": f"subset of {list(LORA_TARGETS)}, all-linear, or a regex over module paths such "
                f"as '.*linear_qkv|.*linear_fc2'"},
        "init_a": {"choices": ("kaiming", "gaussian")},
        "fold_collectives": {"flag": "--lora-fusion", "dest": "lora_fusion",
                             "help": "CCLoRA: under tensor parallelism, fold LoRA's communication "
                                     "into the base layer's collectives (TP=1 always uses the "
                                     "fused kernel)"}},
}


def build_parser() -> Parser:
    p = Parser("mindlora.train", "LoRA fine-tuning on megatron-core (torchrun).")
    groups: dict[str, Any] = {}
    for title, cls, names in _GROUPS:
        group = groups.get(title) or groups.setdefault(title, p.add_argument_group(title))
        p.add_fields(cls, names, group=group, prefix="lora_" if cls is LoRAConfig else "",
                     overrides=_OVERRIDES.get(cls))
    megatron_flags.add_to_parser(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """Parse flags (and the YAML file) into a validated :class:`RunConfig`."""
    parser = build_parser()
    return _to_configs(parser.parse(argv), parser)


def _to_configs(ns: argparse.Namespace, parser: Optional[Parser] = None) -> RunConfig:
    parser = parser or build_parser()
    errors: list[str] = []
    if ns.bf16 and ns.fp16:
        errors.append("--bf16 and --fp16 are mutually exclusive")
    if ns.lr_warmup_fraction is not None and ns.lr_warmup_iters:
        errors.append("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive")
    if ns.num_layer_list and ns.num_layers_per_virtual_pipeline_stage:
        errors.append("--num-layer-list and --num-layers-per-virtual-pipeline-stage are "
                      "mutually exclusive")
    if ns.transformer_impl not in (None, "local"):
        errors.append(f"--transformer-impl {ns.transformer_impl} is not supported: mindlora "
                      f"builds megatron-core's local layers (SDPA attention, LoRA linears) and "
                      f"does not use Transformer Engine; pass --transformer-impl local or drop "
                      f"the flag")
    errors += megatron_flags.check(ns)
    fail_if(errors, "flags")
    train = parser.build(TrainConfig, ns)
    data = parser.build(DataConfig, ns)
    lora = parser.build(LoRAConfig, ns, seed=train.seed)
    parallel = parser.build(ParallelConfig, ns)
    arch: dict[str, Any] = {k: getattr(ns, k) for k in ARCH_FLAGS
                            if k != "tie_word_embeddings" and getattr(ns, k) not in (None, False)}
    if ns.untie_embeddings_and_output_weights:
        arch["tie_word_embeddings"] = False
    if ns.num_layers_per_virtual_pipeline_stage:
        arch["num_layers_per_virtual_pipeline_stage"] = ns.num_layers_per_virtual_pipeline_stage
    _validate(train, data, errors)
    return RunConfig(train, data, lora, parallel, arch)


def _validate(train: TrainConfig, data: DataConfig, errors: list[str]) -> None:
    for name in ("micro_batch_size", "global_batch_size", "seq_length", "train_iters",
                 "log_interval", "pad_to_multiple_of"):
        obj = data if name == "pad_to_multiple_of" else train
        if getattr(obj, name) < 1:
            errors.append(f"--{name.replace('_', '-')} ({getattr(obj, name)}) must be >= 1")
    if train.lr < 0 or train.min_lr < 0 or train.min_lr > train.lr:
        errors.append(f"--lr ({train.lr}) and --min-lr ({train.min_lr}) must satisfy "
                      f"0 <= min-lr <= lr")
    if train.lr_warmup_fraction is not None and not 0 <= train.lr_warmup_fraction <= 1:
        errors.append(f"--lr-warmup-fraction ({train.lr_warmup_fraction}) must be in [0, 1]")
    if not data.data_path:
        errors.append("--data-path is required")
    if train.save_interval is not None and train.save_interval < 1:
        errors.append(f"--save-interval ({train.save_interval}) must be >= 1")
    if train.eval_prompts and not train.eval_interval:
        errors.append(f"--eval-prompts ({train.eval_prompts}) needs --eval-interval")
    if train.eval_max_new_tokens < 1:
        errors.append(f"--eval-max-new-tokens ({train.eval_max_new_tokens}) must be >= 1")
    if train.eval_interval and train.eval_iters < 1 and not train.eval_prompts:
        errors.append(f"--eval-interval ({train.eval_interval}) needs --eval-iters >= 1")
    if train.save_total_limit is not None and train.save_total_limit < 1:
        errors.append(f"--save-total-limit ({train.save_total_limit}) must be >= 1")
    if train.exit_duration_in_mins is not None and train.exit_duration_in_mins <= 0:
        errors.append(f"--exit-duration-in-mins ({train.exit_duration_in_mins}) must be > 0")
    if train.exit_interval is not None and train.exit_interval < 1:
        errors.append(f"--exit-interval ({train.exit_interval}) must be >= 1")
    if train.load is None:
        errors.append("--load (the base checkpoint from tools/convert_ckpt.py) is required")
    fail_if(errors, "flags")
