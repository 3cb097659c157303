"""Megatron / MindSpeed-LLM flags that users paste from their launchers, and what mindlora does.

A flag mindlora's parser accepts must mean what it says. Each flag below is one of:

* ``noop``: accepted because on this stack it is true by construction (the help says why), e.g.
  ``--use-mcore-models`` (every model is megatron-core's) or ``--no-masked-softmax-fusion`` (there
  is no masked-softmax kernel to turn off). Where the flag takes a value, only the value that is
  true by construction is accepted (``--transformer-impl local``, ``--attention-dropout 0``).
* ``refuse``: a feature mindlora does not implement (a kernel, an optimizer layout, a parallelism).
  Accepting it would let a user believe it is on, so it fails at once, naming the flag and why.

Architecture flags (``--num-layers``, ``--rotary-base``, ``--add-qkv-bias`` ...) are not here: the
architecture comes from the checkpoint and those flags are checked against it (``args.py``).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Compat:
    """One pasted Megatron flag: ``kind`` is ``noop`` or ``refuse``; ``why`` goes into help/errors.

    ``value_type`` is None for a switch; otherwise the flag takes one value, and a ``noop`` flag
    accepts only the values in ``allowed`` (anything else is refused, naming the value).
    """

    flag: str
    kind: str
    why: str
    value_type: Optional[type] = None
    allowed: tuple = ()


_FUSION_OFF = "mindlora has no such fused kernel, so there is nothing to turn off"
_NO_KERNEL = "mindlora has no such kernel (the maths is the same without it, only speed differs)"

FLAGS: tuple[Compat, ...] = (
    Compat("--use-mcore-models", "noop", "every mindlora model is a megatron-core GPTModel"),
    Compat("--use-flash-attn", "noop",
           "attention is torch scaled_dot_product_attention, which picks the flash kernel itself "
           "where the device and dtype allow it"),
    Compat("--transformer-impl", "noop", "mindlora builds megatron-core's local layers",
           str, ("local",)),
    Compat("--group-query-attention", "noop",
           "grouped-query attention follows num_query_groups from the checkpoint"),
    Compat("--swiglu", "noop", "every supported family (Llama, Qwen2, Qwen3) uses SwiGLU"),
    Compat("--normalization", "noop", "every supported family uses RMSNorm", str, ("RMSNorm",)),
    Compat("--position-embedding-type", "noop", "every supported family uses RoPE", str,
           ("rope",)),
    Compat("--use-rotary-position-embeddings", "noop", "every supported family uses RoPE"),
    Compat("--disable-bias-linear", "noop",
           "linears have no bias (only the QKV bias, which the checkpoint decides)"),
    Compat("--attention-dropout", "noop", "attention dropout is 0 (LoRA dropout is --lora-dropout)",
           float, (0.0,)),
    Compat("--hidden-dropout", "noop", "hidden dropout is 0 (LoRA dropout is --lora-dropout)",
           float, (0.0,)),
    Compat("--init-method-std", "noop",
           "base weights come from --load; LoRA A is drawn as --lora-init-a says", float),
    Compat("--make-vocab-size-divisible-by", "noop",
           "the vocabulary is padded to a multiple of TP only (Megatron's rule with 1)", int,
           (1,)),
    Compat("--no-masked-softmax-fusion", "noop", _FUSION_OFF),
    Compat("--no-gradient-accumulation-fusion", "noop", _FUSION_OFF),
    Compat("--no-bias-gelu-fusion", "noop", _FUSION_OFF),
    Compat("--no-rope-fusion", "noop", _FUSION_OFF),
    Compat("--no-create-attention-mask-in-dataloader", "noop",
           "the data loader never builds attention masks (attention is causal in the model)"),
    Compat("--variable-seq-lengths", "noop",
           "batches may always differ in length; pipeline micro-batches of one step are padded "
           "to the step's longest"),
    Compat("--log-throughput", "noop", "the log line always shows tokens/s"),
    Compat("--lora-ckpt-filter", "noop", "adapter checkpoints always hold LoRA tensors only"),
    Compat("--context-parallel-size", "noop", "mindlora has no context parallelism", int, (1,)),
    Compat("--use-fused-rmsnorm", "refuse", _NO_KERNEL),
    Compat("--use-fused-swiglu", "refuse", _NO_KERNEL),
    Compat("--use-fused-rotary-pos-emb", "refuse", _NO_KERNEL),
    Compat("--use-fused-ring-attention-update", "refuse", _NO_KERNEL),
    Compat("--use-mc2", "refuse", "MC2 (Ascend matmul/communication fusion) is not implemented; "
           "--lora-fusion is mindlora's communication fusion"),
    Compat("--use-ascend-mc2", "refuse", "MC2 is not implemented; see --lora-fusion"),
    Compat("--attention-softmax-in-fp32", "refuse",
           "the softmax precision is SDPA's choice and cannot be forced to float32"),
    Compat("--use-distributed-optimizer", "refuse",
           "the optimizer state is not sharded over data parallel (LoRA state is small)"),
    Compat("--overlap-grad-reduce", "refuse",
           "gradients are reduced after the backward pass, not overlapped with it"),
    Compat("--overlap-param-gather", "refuse", "parameters are not sharded, nothing is gathered"),
    Compat("--reuse-fp32-param", "refuse", "LoRA factors are float32 already; base is frozen"),
    Compat("--recompute-activation-function", "refuse",
           "use --recompute-granularity selective/full"),
    Compat("--swap-attention", "refuse", "activation swapping is not implemented"),
    Compat("--no-shared-storage", "refuse",
           "every node must see --load, --lora-load and --save at the same path"),
    Compat("--num-workers", "refuse", "samples are read in the training process", int),
    Compat("--no-save-optim", "refuse", "adapter checkpoints always hold the optimizer state"),
    Compat("--no-save-rng", "refuse", "adapter checkpoints always hold the RNG states"),
    Compat("--train-samples", "refuse", "give --train-iters", int),
    Compat("--log-timers-to-tensorboard", "refuse", "timers are not written to TensorBoard"),
    Compat("--log-validation-ppl-to-tensorboard", "refuse",
           "TensorBoard gets the validation loss; the PPL is in the log line"),
)


def add_to_parser(parser: argparse.ArgumentParser) -> None:
    """Register every flag (so it is parsed with its arity) in one help group."""
    group = parser.add_argument_group(
        "Megatron flags from pasted launchers",
        "'no effect' flags are true by construction here; 'refused' ones are not implemented "
        "and fail at once")
    for c in FLAGS:
        if c.flag in parser._option_string_actions:
            continue  # the parser implements it itself (its own handling wins)
        dest = "compat_" + c.flag[2:].replace("-", "_")
        label = "no effect" if c.kind == "noop" else "refused"
        if c.value_type is None:
            group.add_argument(c.flag, dest=dest, action="store_true",
                               help=f"{label}: {c.why}")
        else:
            allowed = f" (only {', '.join(map(str, c.allowed))})" if c.allowed else ""
            group.add_argument(c.flag, dest=dest, type=c.value_type, default=None,
                               metavar="VALUE", help=f"{label}{allowed}: {c.why}")


def check(ns: argparse.Namespace) -> list[str]:
    """One message per refused flag (or not-allowed value) given; empty when all is well."""
    errors = []
    for c in FLAGS:
        value: Any = getattr(ns, "compat_" + c.flag[2:].replace("-", "_"), None)
        if value is None or value is False:
            continue
        if c.kind == "refuse":
            errors.append(f"{c.flag} is not implemented by mindlora: {c.why}; remove it")
        elif c.allowed and value not in c.allowed:
            shown = ", ".join(map(str, c.allowed))
            errors.append(f"{c.flag} {value} is not supported: {c.why} (only {shown})")
    return errors


def dests() -> set[str]:
    """Namespace names of these flags (they belong to no config)."""
    return {"compat_" + c.flag[2:].replace("-", "_") for c in FLAGS}
