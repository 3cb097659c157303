"""Megatron-style command-line flags (and ``--config FILE.yaml``) -> small typed configs.

The flags are the ones MindSpeed-LLM / Megatron-LM users already type. A YAML file goes through
the same parser: each key (a flag name, dashes or underscores) becomes ``--flag=value``, so it
gets the flag's type and choices (``lr: 1e-4``, which PyYAML reads as a string, is a float), and
the command line, parsed after it, wins. Unknown flags or keys, bad values and flags that
contradict each other fail at once naming them (and the file). Architecture flags
(``--num-layers`` ...) are optional: the architecture comes from the checkpoint, and any such flag
given is checked against it. Megatron flags mindlora does not implement are refused by name
(``megatron_flags.py``).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml

from mindlora.config import LORA_TARGETS, LoRAConfig, ParallelConfig, fail_if
from mindlora.training import megatron_flags


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
    distributed_backend: Optional[str] = None
    """Checked against the backend the device implies (cuda: nccl, npu: hccl, cpu: gloo)."""


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
    arch_overrides: dict[str, Any]
    """ModelConfig field -> value a flag claims (checked against the checkpoint), plus
    ``num_layers_per_virtual_pipeline_stage`` and ``padded_vocab_size``."""


ARCH_FLAGS = {"num_layers": "--num-layers", "hidden_size": "--hidden-size",
              "ffn_hidden_size": "--ffn-hidden-size",
              "num_attention_heads": "--num-attention-heads",
              "num_query_groups": "--num-query-groups",
              "max_position_embeddings": "--max-position-embeddings",
              "kv_channels": "--kv-channels", "rotary_base": "--rotary-base",
              "norm_epsilon": "--norm-epsilon", "padded_vocab_size": "--padded-vocab-size",
              "add_qkv_bias": "--add-qkv-bias", "qk_layernorm": "--qk-layernorm",
              "tie_word_embeddings": "--untie-embeddings-and-output-weights",
              "num_moe_experts": "--num-experts", "moe_router_topk": "--moe-router-topk",
              "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
              "moe_aux_loss_coeff": "--moe-aux-loss-coeff"}
"""Architecture flag of each checked ModelConfig field (add_qkv_bias, qk_layernorm and
tie_word_embeddings are switches)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises ValueError (the entry point prints one line) instead of exiting."""

    def error(self, message: str):
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mindlora.train", allow_abbrev=False,
                description="LoRA fine-tuning on megatron-core (torchrun).")
    a = p.add_argument
    a("--config", help="YAML file whose keys are flag names; the command line wins")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layer-list", type=str, default=None, help="e.g. 10,12,8")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="mixture-of-experts models: split the routed experts over this many ranks")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="mixture-of-experts models: must equal --tensor-model-parallel-size "
                        "(experts are split over the attention TP group); another value is "
                        "refused")
    g = p.add_argument_group("batch and schedule")
    for flag, typ in (("--micro-batch-size", int), ("--global-batch-size", int),
                      ("--seq-length", int), ("--train-iters", int), ("--lr", float),
                      ("--min-lr", float), ("--lr-warmup-fraction", float),
                      ("--lr-warmup-iters", int), ("--lr-decay-iters", int),
                      ("--weight-decay", float), ("--clip-grad", float), ("--adam-beta1", float),
                      ("--adam-beta2", float), ("--adam-eps", float), ("--seed", int),
                      ("--initial-loss-scale", float), ("--log-interval", int),
                      ("--save-interval", int), ("--eval-interval", int), ("--eval-iters", int),
                      ("--exit-duration-in-mins", float), ("--save-total-limit", int),
                      ("--max-nan-iterations", int), ("--exit-interval", int),
                      ("--eval-max-new-tokens", int),
                      ("--recompute-num-layers", int)):
        g.add_argument(flag, type=typ, default=None)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default=None)
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--transformer-impl", default=None,
                   help="local (the only one: megatron-core's local layers with LoRA); "
                        "transformer_engine is refused")
    g = p.add_argument_group("checkpoints and logging")
    for flag in ("--load", "--save", "--lora-load", "--tensorboard-dir", "--eval-prompts"):
        g.add_argument(flag, default=None)
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--no-load-optim", action="store_true",
                   help="resume without the optimizer and loss-scaler state")
    g.add_argument("--no-load-rng", action="store_true", help="resume without the RNG states")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM finish the iteration, save and exit 0")
    g.add_argument("--distributed-backend", choices=["nccl", "hccl", "gloo"], default=None,
                   help="checked against the device's backend (cuda: nccl, npu: hccl, cpu: gloo)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=None)
    g.add_argument("--lora-alpha", type=float, default=None)
    g.add_argument("--lora-dropout", type=float, default=None)
    g.add_argument("--lora-target-modules", nargs="+", default=None,
                   help=f"subset of {list(LORA_TARGETS)}, all-linear, or a regex over module "
                        f"paths such as '.*linear_qkv|.*linear_fc2'")
    g.add_argument("--lora-use-rslora", action="store_true")
    g.add_argument("--lora-init-a", choices=["kaiming", "gaussian"], default=None)
    g.add_argument("--lora-fusion", action="store_true", help="CCLoRA communication fusion")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None)
    g.add_argument("--split", default=None)
    g.add_argument("--tokenizer-name-or-path", default=None)
    g.add_argument("--tokenizer-type", default=None,
                   choices=["PretrainedFromHF", "SentencePiece", "Tiktoken", "auto"],
                   help="no effect: the tokenizer kind is detected from its files")
    g.add_argument("--is-instruction-dataset", action="store_true",
                   help="no effect: training data is always instruction data (labels masked)")
    g.add_argument("--prompt-type", default=None,
                   help="checked against the template the data was preprocessed with")
    g.add_argument("--stage", choices=["sft"], default=None)
    g.add_argument("--no-pad-to-seq-lengths", action="store_true")
    g.add_argument("--pad-to-multiple-of", type=int, default=None)
    g = p.add_argument_group("architecture checks (optional; the checkpoint is the source)")
    for field_ in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                   "num_query_groups", "max_position_embeddings", "kv_channels",
                   "padded_vocab_size", "num_moe_experts", "moe_router_topk",
                   "moe_ffn_hidden_size"):
        g.add_argument(ARCH_FLAGS[field_], dest=field_, type=int, default=None)
    for field_ in ("rotary_base", "norm_epsilon", "moe_aux_loss_coeff"):
        g.add_argument(ARCH_FLAGS[field_], dest=field_, type=float, default=None)
    for field_ in ("add_qkv_bias", "qk_layernorm", "tie_word_embeddings"):
        g.add_argument(ARCH_FLAGS[field_], action="store_true")
    megatron_flags.add_to_parser(p)
    return p


def _yaml_tokens(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The YAML file as command-line tokens (``--flag=value``), checked by the parser itself."""
    with open(path) as f:
        try:
            loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values")
    by_name = {s[2:].replace("-", "_"): a for a in parser._actions for s in a.option_strings
               if s.startswith("--") and s not in ("--config", "--help")}
    unknown = [k for k in loaded if str(k).replace("-", "_") not in by_name]
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; keys are flag names such as "
                         f"micro-batch-size")
    tokens: list[str] = []
    for key, value in loaded.items():
        action = by_name[str(key).replace("-", "_")]
        flag = action.option_strings[-1]
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ValueError(f"{path}: {key}: expected true or false, not {value!r}")
            tokens += [flag] if value else []
        elif action.nargs == "+":
            items = value.split() if isinstance(value, str) else value
            if not isinstance(items, list) or not items:
                raise ValueError(f"{path}: {key}: expected a list or a space-separated string")
            tokens += [flag, *map(str, items)]
        elif isinstance(value, (list, dict, bool)):
            raise ValueError(f"{path}: {key}: expected one value, not {value!r}")
        else:
            tokens.append(f"{flag}={value}")
    try:
        parser.parse_args(tokens)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return tokens


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
        ns = parser.parse_args(_yaml_tokens(parser, ns.config) + argv)
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
    if ns.transformer_impl not in (None, "local"):
        errors.append(f"--transformer-impl {ns.transformer_impl} is not supported: mindlora "
                      f"builds megatron-core's local layers (SDPA attention, LoRA linears) and "
                      f"does not use Transformer Engine; pass --transformer-impl local or drop "
                      f"the flag")
    errors += megatron_flags.check(ns)
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
        expert_model_parallel_size=ns.expert_model_parallel_size,
        expert_tensor_parallel_size=ns.expert_tensor_parallel_size,
        num_layer_list=([int(x) for x in str(ns.num_layer_list).split(",")]
                        if ns.num_layer_list else None),
        virtual_pipeline_model_parallel_size=None,
    )
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
