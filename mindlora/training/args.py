"""Megatron-style command-line flags (and ``--config FILE.yaml``) -> small typed configs.

The flags are the ones MindSpeed-LLM / Megatron-LM users already type. YAML files use the same
names (dashes or underscores); the command line wins over the file. Unknown flags or keys, and
flags that contradict each other, fail at once naming them. Architecture flags (``--num-layers``
...) are optional: the architecture comes from the checkpoint, and any such flag given is
checked against it.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml

from mindlora.config import LORA_TARGETS, LoRAConfig, ParallelConfig, fail_if


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision and checkpoint settings of one run."""

    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 1024
    train_iters: int = 100
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_fraction: Optional[float] = None
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    bf16: bool = False
    fp16: bool = False
    initial_loss_scale: float = 2.0 ** 16
    seed: int = 1234
    load: Optional[str] = None
    """Base model: a mindlora/Megatron checkpoint directory (``convert_ckpt.py`` output)."""
    save: Optional[str] = None
    save_interval: Optional[int] = None
    lora_load: Optional[str] = None
    """Adapter checkpoint to resume from (or to start from, with ``--finetune``)."""
    finetune: bool = False
    """Load adapter weights only: reset iteration, optimizer and data position."""
    log_interval: int = 1
    eval_interval: Optional[int] = None
    eval_iters: int = 0
    tensorboard_dir: Optional[str] = None
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    max_nan_iterations: int = 10
    """Stop after this many consecutive skipped (NaN/Inf) iterations."""
    eval_prompts: Optional[str] = None
    """Prompts (one a line, or JSONL) answered greedily every ``--eval-interval``."""
    eval_max_new_tokens: int = 64
    exit_interval: Optional[int] = None
    """Stop (after saving) at the first iteration divisible by this (tests use it to stop)."""


@dataclass
class DataConfig:
    """Where the preprocessed data lives and how batches are padded."""

    data_path: list[str] = field(default_factory=list)
    """Prefix, or ``W1 P1 W2 P2 ...`` weighted blend of prefixes."""
    split: str = "100,0,0"
    tokenizer_name_or_path: Optional[str] = None
    is_instruction_dataset: bool = True
    prompt_type: Optional[str] = None
    pad_to_seq_lengths: bool = True
    pad_to_multiple_of: int = 8


@dataclass
class RunConfig:
    """Everything a training run needs, parsed and validated."""

    train: TrainConfig
    data: DataConfig
    lora: LoRAConfig
    parallel: ParallelConfig
    arch_overrides: dict[str, int]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mindlora.train", allow_abbrev=False,
                                description="LoRA fine-tuning on megatron-core (torchrun).")
    a = p.add_argument
    a("--config", help="YAML file whose keys are flag names; the command line wins")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layer-list", type=str, default=None, help="e.g. 10,12,8")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g = p.add_argument_group("batch and schedule")
    for flag, typ in (("--micro-batch-size", int), ("--global-batch-size", int),
                      ("--seq-length", int), ("--train-iters", int), ("--lr", float),
                      ("--min-lr", float), ("--lr-warmup-fraction", float),
                      ("--lr-warmup-iters", int), ("--lr-decay-iters", int),
                      ("--weight-decay", float), ("--clip-grad", float), ("--adam-beta1", float),
                      ("--adam-beta2", float), ("--adam-eps", float), ("--seed", int),
                      ("--initial-loss-scale", float), ("--log-interval", int),
                      ("--save-interval", int), ("--eval-interval", int), ("--eval-iters", int),
                      ("--max-nan-iterations", int), ("--exit-interval", int),
                      ("--eval-max-new-tokens", int),
                      ("--recompute-num-layers", int)):
        g.add_argument(flag, type=typ, default=None)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default=None)
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g = p.add_argument_group("checkpoints and logging")
    for flag in ("--load", "--save", "--lora-load", "--tensorboard-dir", "--eval-prompts"):
        g.add_argument(flag, default=None)
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--no-load-optim", action="store_true", help="accepted for Megatron scripts")
    g.add_argument("--no-load-rng", action="store_true", help="accepted for Megatron scripts")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=None)
    g.add_argument("--lora-alpha", type=float, default=None)
    g.add_argument("--lora-dropout", type=float, default=None)
    g.add_argument("--lora-target-modules", nargs="+", default=None,
                   help=f"subset of {list(LORA_TARGETS)} or all-linear")
    g.add_argument("--lora-use-rslora", action="store_true")
    g.add_argument("--lora-init-a", choices=["kaiming", "gaussian"], default=None)
    g.add_argument("--lora-fusion", action="store_true", help="CCLoRA communication fusion")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None)
    g.add_argument("--split", default=None)
    g.add_argument("--tokenizer-name-or-path", default=None)
    g.add_argument("--tokenizer-type", default=None, help="accepted for Megatron scripts")
    g.add_argument("--is-instruction-dataset", action="store_true")
    g.add_argument("--prompt-type", default=None)
    g.add_argument("--stage", choices=["sft"], default=None)
    g.add_argument("--no-pad-to-seq-lengths", action="store_true")
    g.add_argument("--pad-to-multiple-of", type=int, default=None)
    g = p.add_argument_group("architecture checks (optional; the checkpoint is the source)")
    for flag in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
                 "--num-query-groups", "--max-position-embeddings", "--padded-vocab-size"):
        g.add_argument(flag, type=int, default=None)
    return p


_STORE_TRUE = {"sequence_parallel", "bf16", "fp16", "finetune", "no_load_optim", "no_load_rng",
               "lora_use_rslora", "lora_fusion", "is_instruction_dataset",
               "no_pad_to_seq_lengths"}


def _merge_yaml(parser: argparse.ArgumentParser, ns: argparse.Namespace,
                argv: Sequence[str]) -> argparse.Namespace:
    with open(ns.config) as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{ns.config}: expected a mapping of flag names to values")
    known = vars(ns)
    given_on_cli = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}
    unknown = [k for k in loaded if k.replace("-", "_") not in known or k == "config"]
    if unknown:
        raise ValueError(f"{ns.config}: unknown key(s) {unknown}; keys are flag names such as "
                         f"micro-batch-size")
    for key, value in loaded.items():
        dest = key.replace("-", "_")
        if dest in given_on_cli:
            continue
        if dest in ("data_path", "lora_target_modules") and isinstance(value, str):
            value = value.split()
        setattr(ns, dest, value)
    return ns


def parse_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """Parse flags (and the YAML file) into a validated :class:`RunConfig`."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ValueError(f"unknown flag(s): {' '.join(unknown)} (see python -m mindlora.train "
                         f"--help)")
    if ns.config:
        ns = _merge_yaml(parser, ns, argv)
    return _to_configs(ns)


def _pick(ns: argparse.Namespace, cls: type, names: dict[str, str]) -> Any:
    kwargs = {field_: getattr(ns, dest) for field_, dest in names.items()
              if getattr(ns, dest, None) is not None}
    return cls(**kwargs)


def _to_configs(ns: argparse.Namespace) -> RunConfig:
    errors: list[str] = []
    if ns.bf16 and ns.fp16:
        errors.append("--bf16 and --fp16 are mutually exclusive")
    if ns.lr_warmup_fraction is not None and ns.lr_warmup_iters:
        errors.append("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive")
    if ns.num_layer_list and ns.num_layers_per_virtual_pipeline_stage:
        errors.append("--num-layer-list and --num-layers-per-virtual-pipeline-stage are "
                      "mutually exclusive")
    fail_if(errors, "flags")
    train_fields = [f.name for f in dataclasses.fields(TrainConfig)]
    train = _pick(ns, TrainConfig, {f: f for f in train_fields if hasattr(ns, f)})
    data = DataConfig(
        data_path=list(ns.data_path or []),
        split=ns.split or "100,0,0",
        tokenizer_name_or_path=ns.tokenizer_name_or_path,
        is_instruction_dataset=True,
        prompt_type=ns.prompt_type,
        pad_to_seq_lengths=not ns.no_pad_to_seq_lengths,
        pad_to_multiple_of=ns.pad_to_multiple_of or 8,
    )
    lora = _pick(ns, LoRAConfig, {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                                  "target_modules": "lora_target_modules",
                                  "init_a": "lora_init_a"})
    lora.use_rslora, lora.fusion, lora.seed = ns.lora_use_rslora, ns.lora_fusion, train.seed
    parallel = ParallelConfig(
        tensor_model_parallel_size=ns.tensor_model_parallel_size,
        pipeline_model_parallel_size=ns.pipeline_model_parallel_size,
        sequence_parallel=ns.sequence_parallel,
        num_layer_list=([int(x) for x in str(ns.num_layer_list).split(",")]
                        if ns.num_layer_list else None),
        virtual_pipeline_model_parallel_size=None,
    )
    arch = {k: getattr(ns, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                        "num_attention_heads", "num_query_groups",
                                        "max_position_embeddings", "padded_vocab_size")
            if getattr(ns, k) is not None}
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
    if train.load is None:
        errors.append("--load (the base checkpoint from tools/convert_ckpt.py) is required")
    fail_if(errors, "flags")
