"""Loading a model's weights from checkpoints: the read half shared by training and generation.

Base weights (:func:`load_base`) and adapter weights (:func:`load_adapter_weights`) load into this
rank's model chunks from a checkpoint of any TP x PP (x EP) layout (mindlora's, or Megatron-LM /
MindSpeed-LLM's), resharded as they are read (:func:`load_model_shard`). Training (``--load``,
``--lora-load --finetune``; its exact resume adds the optimizer and RNG state on top) and
generation both load through here, so a checkpoint that trains also generates. Rank files carry a
content checksum (:func:`content_digest`, written by the training save) that every load checks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional

import torch
from megatron.core import parallel_state

from mindlora.checkpoint import describe
from mindlora.checkpoint import megatron_format as fmt
from mindlora.checkpoint.reshard import MegatronReader, shard_tensor
from mindlora.config import LoRAConfig, ModelConfig, ParallelConfig
from mindlora.lora.factors import is_lora_key
from mindlora.parallel.layout import chunk_layer_ids, expert_owner, pad_vocab


def content_digest(payload: dict) -> str:
    """SHA-256 over every tensor of a rank file's payload (path, dtype, shape, bytes) and its
    plain values: torch does not check its zip CRCs, so a flipped byte in a tensor would
    otherwise load as a silently different adapter or optimizer state."""
    h = hashlib.sha256()

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for k in sorted(node, key=str):
                if path or k not in ("content_sha256", "mindlora", "args"):  # metadata
                    walk(node[k], f"{path}/{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")
        elif isinstance(node, torch.Tensor):
            t = node.detach().cpu().contiguous().reshape(-1)
            h.update(f"{path}:{t.dtype}:{tuple(node.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{path}={node!r}".encode())

    walk(payload, "")
    return h.hexdigest()


def verify_content(payload: dict, path: str) -> None:
    """Raise a ValueError naming ``path`` when its content does not match the saved digest."""
    saved = payload.get("content_sha256")
    if saved is not None and content_digest(payload) != saved:
        raise ValueError(f"{path} is corrupt: its content does not match the checksum written "
                         f"with it (a damaged or partly copied file); use another checkpoint")


def rank_files(root: str, iteration) -> list[str]:
    """Every ``mp_rank_*/model_optim_rng.pt`` of one iteration."""
    it_dir = os.path.join(root, fmt.iteration_dir_name(iteration))
    return [os.path.join(it_dir, d, fmt.RANK_FILE) for d in sorted(os.listdir(it_dir))
            if d.startswith("mp_rank_") and os.path.isfile(os.path.join(it_dir, d, fmt.RANK_FILE))]


def load_model_shard(load_dir: str, tp_size: int, tp_rank: int, layer_ids: list[int],
                     pre_process: bool, post_process: bool, tie_word_embeddings: bool,
                     padded_vocab_size: int, iteration: Optional[fmt.Iteration] = None,
                     hf_config_dir: Optional[str] = None, ep_size: int = 1, ep_rank: int = 0
                     ) -> dict[str, torch.Tensor]:
    """State dict of one model chunk in the *target* layout, from a checkpoint of any layout.

    Reads only the source rank files that hold ``layer_ids`` (memory-mapped), gathers each tensor
    to its full shape and cuts this rank's shard (mindlora.parallel.layout). Works for base and
    adapter checkpoints alike; an adapter yields only ``lora_A``/``lora_B`` keys.

    Args:
        load_dir: the checkpoint root (holds ``latest_checkpointed_iteration.txt``).
        tp_size, tp_rank: the target tensor-parallel layout and this rank.
        layer_ids: global ids of the chunk's layers, in local order (``decoder.layers.{j}``).
        pre_process / post_process: the chunk holds the embedding / final norm and output layer.
        tie_word_embeddings: the model ties the output layer to the embedding; a last stage
            without the embedding then gets ``output_layer.weight`` as a copy of it.
        padded_vocab_size: vocabulary rows of the target model (all TP ranks together).
        hf_config_dir: HF config.json folder for Megatron-LM checkpoints (see
            ``describe.read_checkpoint_meta``).
        ep_size, ep_rank: the target expert-parallel layout: only this rank's routed experts
            are returned, renumbered from 0 (mixture-of-experts models).
    """
    reader = MegatronReader(load_dir, iteration, hf_config_dir)
    if reader.model_config.tie_word_embeddings != tie_word_embeddings:
        raise ValueError(f"{load_dir}: checkpoint has tie_word_embeddings="
                         f"{reader.model_config.tie_word_embeddings}, model has "
                         f"{tie_word_embeddings}")
    out: dict[str, torch.Tensor] = {}
    for j, layer_id in enumerate(layer_ids):
        for key, full in reader.full_layer(layer_id).items():
            owner, key = expert_owner(key, reader.model_config.num_moe_experts or 0, ep_size)
            if owner in (-1, ep_rank):
                out[f"decoder.layers.{j}.{key}"] = shard_tensor(key, full, tp_size, tp_rank)
    if reader.kind != "base":
        return out
    wanted = []
    if pre_process:
        wanted.append(("embedding.word_embeddings.weight", "embedding.word_embeddings.weight"))
    if post_process:
        wanted.append(("decoder.final_layernorm.weight", "decoder.final_layernorm.weight"))
        if not tie_word_embeddings:
            wanted.append(("output_layer.weight", "output_layer.weight"))
        elif not pre_process:
            wanted.append(("output_layer.weight", "embedding.word_embeddings.weight"))
    for key, source_key in wanted:
        out[key] = shard_tensor(key, reader.full_global(source_key), tp_size, tp_rank,
                                padded_vocab_size)
    return out


def chunk_shard(load_dir: str, chunk: torch.nn.Module, vp_stage: int, model: ModelConfig,
                parallel: ParallelConfig, iteration=None, hf_config_dir: Optional[str] = None
                ) -> dict[str, torch.Tensor]:
    """This rank's chunk ``vp_stage`` read from a checkpoint of any layout (resharded); a
    Megatron-LM checkpoint's args are completed by ``hf_config_dir``'s config.json."""
    tp = parallel.tensor_model_parallel_size
    return load_model_shard(
        load_dir, tp, parallel_state.get_tensor_model_parallel_rank(),
        chunk_layer_ids(model, parallel, parallel_state.get_pipeline_model_parallel_rank(),
                        vp_stage),
        chunk.pre_process, chunk.post_process, model.tie_word_embeddings,
        pad_vocab(model.vocab_size, tp), iteration=iteration, hf_config_dir=hf_config_dir,
        ep_size=parallel.expert_model_parallel_size,
        ep_rank=parallel_state.get_expert_model_parallel_rank())


def check_compatible(meta: dict, path: str, model: ModelConfig, lora: LoRAConfig) -> None:
    """Refuse an adapter saved for another base model or with other LoRA flags (all reasons)."""
    errors = []
    saved_model = ModelConfig.from_dict(meta["model_config"])
    if meta.get("source") == "megatron":  # args describe the shape only: compare that
        fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "kv_channels")
        same = all(getattr(saved_model, f) == getattr(model, f) for f in fields)
    else:
        same = saved_model == model
    if not same:
        errors.append(f"it was trained on another base model ({saved_model.family}, "
                      f"{saved_model.num_layers} layers, hidden {saved_model.hidden_size}) than "
                      f"--load ({model.family}, {model.num_layers} layers, hidden "
                      f"{model.hidden_size})")
    saved = LoRAConfig.from_dict(meta["lora_config"])
    for flag, a, b in (("--lora-r", saved.r, lora.r), ("--lora-alpha", saved.alpha, lora.alpha),
                       ("--lora-target-modules", list(saved.target_modules),
                        list(lora.target_modules)),
                       ("--lora-use-rslora", saved.use_rslora, lora.use_rslora)):
        if a != b:
            errors.append(f"{flag} is {b} but the adapter was saved with {a}")
    if errors:
        raise ValueError(f"--lora-load {path}: " + "; ".join(errors))


def saved_lora_structure(lora_load: str, lora: LoRAConfig, hf_config_dir: Optional[str] = None
                         ) -> LoRAConfig:
    """``lora`` (the flags) with the rank-stacked structure (``ranks``, ``scalings``) of the
    adapter in ``lora_load``, so the model is built to hold it; flags are checked on load."""
    _, meta = describe.read_checkpoint_meta(lora_load, hf_config_dir=hf_config_dir)
    saved = meta.get("lora_config") or {}
    ranks = {k: v for k, v in (saved.get("ranks") or {}).items() if k in lora.target_modules}
    scalings = {k: v for k, v in (saved.get("scalings") or {}).items()
                if k in lora.target_modules}
    return dataclasses.replace(lora, ranks=ranks, scalings=scalings)


def read_adapter_meta(lora_load: str, model: ModelConfig, lora: LoRAConfig,
                      hf_config_dir: Optional[str] = None) -> tuple:
    """(iteration, metadata) of the adapter checkpoint ``lora_load``, refused by name when it is
    not an adapter or was trained on another model or with other LoRA flags."""
    iteration, meta = describe.read_checkpoint_meta(lora_load, hf_config_dir=hf_config_dir)
    if meta["kind"] != "adapter":
        raise ValueError(f"--lora-load {lora_load} holds a {meta['kind']} checkpoint, not an "
                         f"adapter (pass base weights with --load)")
    check_compatible(meta, lora_load, model, lora)
    return iteration, meta


def load_adapter_weights(lora_load: str, chunks: list[torch.nn.Module], model: ModelConfig,
                         lora: LoRAConfig, parallel: ParallelConfig,
                         hf_config_dir: Optional[str] = None) -> None:
    """Load the LoRA factors of ``lora_load`` into this rank's chunks, from any TP x PP layout
    (resharded); every rank file's checksum is checked first (adapters are small)."""
    iteration, _ = read_adapter_meta(lora_load, model, lora, hf_config_dir)
    for rank_path in rank_files(lora_load, iteration):
        verify_content(fmt.load_rank_file(rank_path), rank_path)
    for v, chunk in enumerate(chunks):
        load_lora_weights(chunk, chunk_shard(lora_load, chunk, v, model, parallel, iteration,
                                             hf_config_dir), lora_load)


def load_lora_weights(chunk: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    own = {k for k in chunk.state_dict() if is_lora_key(k)}
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or unexpected:
        raise ValueError(f"{where}: adapter tensors do not match the model "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    with torch.no_grad():
        params = dict(chunk.named_parameters())
        for k, t in sd.items():
            if params[k].shape != t.shape:
                raise ValueError(f"{where}: {k} has shape {tuple(t.shape)}, the model expects "
                                 f"{tuple(params[k].shape)}")
            params[k].copy_(t)


def load_base(load_dir: str, chunks: list[torch.nn.Module], model: ModelConfig,
              parallel: ParallelConfig, hf_config_dir: Optional[str] = None) -> None:
    """Load the frozen base weights of this rank's chunks from a checkpoint of any layout
    (mindlora's, or Megatron-LM / MindSpeed-LLM's: see mindlora.checkpoint.megatron_lm)."""
    for v, chunk in enumerate(chunks):
        sd = chunk_shard(load_dir, chunk, v, model, parallel, hf_config_dir=hf_config_dir)
        own = {k for k in chunk.state_dict()
               if not k.endswith("_extra_state") and not is_lora_key(k)}
        missing = sorted(own - set(sd))
        if missing:
            raise ValueError(f"--load {load_dir}: the checkpoint lacks {len(missing)} tensor(s) "
                             f"the model needs, e.g. {missing[:3]}")
        params = dict(chunk.state_dict(keep_vars=True))
        with torch.no_grad():
            for k in own:
                if params[k].shape != sd[k].shape:
                    raise ValueError(f"--load {load_dir}: {k} has shape {tuple(sd[k].shape)}, the "
                                     f"model expects {tuple(params[k].shape)}")
                if sd[k].is_floating_point() and not bool(torch.isfinite(sd[k]).all()):
                    raise ValueError(f"--load {_describe(load_dir)}: {k} holds NaN/Inf values; "
                                     f"the base checkpoint is damaged (convert it again)")
                params[k].copy_(sd[k])


def _describe(load_dir: str) -> str:
    """``load_dir`` and the iteration directory its tracker names (where the rank files are)."""
    try:
        return os.path.join(load_dir, fmt.iteration_dir_name(fmt.read_tracker(load_dir)))
    except (OSError, ValueError):
        return load_dir
