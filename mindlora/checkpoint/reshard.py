"""Resharding: gather a saved layout to full tensors, cut full tensors into any TP x PP layout.

Only slicing lives here. Which axis a parameter splits along comes from the one table in
mindlora.parallel.layout; which layers a rank holds comes from the checkpoint's own metadata when
reading, and from the layer split (``--num-layer-list`` or even) when writing. Layers are visited
one at a time, so memory holds about one layer (plus what the sink buffers).

"Full" tensors are what TP=1 holds, except that vocabulary rows are unpadded (``vocab_size``):
padding depends on the TP size, so it is stripped on read and redone on write.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from mindlora.checkpoint import describe
from mindlora.checkpoint import megatron_format as fmt
from mindlora.checkpoint.megatron_lm import megatron_args, normalize_keys, to_key_style
from mindlora.checkpoint.rank_writer import StreamingRankFile
from mindlora.config import LoRAConfig, ModelConfig
from mindlora.lora.factors import is_lora_key
from mindlora.parallel.layout import (expert_global_key, expert_owner, experts_per_rank, gather,
                                      layer_counts, layer_ids, pad_vocab, shard, split_rule)
from mindlora.runtime.dtypes import dtype_from_name

VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
GLOBAL_KEYS = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
               "output_layer.weight")


def shard_tensor(key: str, full: torch.Tensor, tp_size: int, tp_rank: int,
                 padded_vocab_size: Optional[int] = None) -> torch.Tensor:
    """Rank ``tp_rank``'s shard of the full tensor ``full`` stored under ``key``.

    Vocabulary tensors are first padded with zero rows to ``padded_vocab_size`` (zero rows give
    zero logits for the padding ids, which no token uses).
    """
    if key.endswith(VOCAB_KEYS) and padded_vocab_size is not None:
        extra = padded_vocab_size - full.shape[0]
        if extra < 0:
            raise ValueError(f"{key}: {full.shape[0]} rows do not fit padded vocab "
                             f"{padded_vocab_size}")
        if extra:
            full = torch.cat([full, full.new_zeros(extra, *full.shape[1:])])
    if tp_size == 1:
        return full.contiguous()  # nothing to cut; spare a copy of every tensor on TP1 targets
    return shard(full, split_rule(key), tp_size, tp_rank)


class MegatronReader:
    """Lazy, memory-mapped reader of a mindlora checkpoint saved under any TP x PP x VPP layout.

    On opening, every rank file's metadata is loaded (pickles only, no tensor data), so a missing,
    truncated or inconsistent file is reported before any output is written.
    """

    def __init__(self, root: str, iteration: Optional[fmt.Iteration] = None,
                 hf_config_dir: Optional[str] = None) -> None:
        self.root, self.hf_config_dir = root, hf_config_dir
        self.iteration, metas = describe.describe_checkpoint(root, iteration, hf_config_dir)
        self.meta = metas[0, 0]
        # Megatron-LM / MindSpeed-LLM (args, no mindlora metadata): the metas of every rank file
        self._legacy = metas if self.meta.get("source") == "megatron" else None
        self.kind: str = self.meta["kind"]
        self.model_config = ModelConfig.from_dict(self.meta["model_config"])
        lora = self.meta.get("lora_config")
        self.lora_config: Optional[LoRAConfig] = LoRAConfig.from_dict(lora) if lora else None
        self.tp, self.pp = int(self.meta["tp"]), int(self.meta["pp"])
        self.ep = int(self.meta.get("ep", 1))
        self.params_dtype = dtype_from_name(self.meta["params_dtype"])
        self._chunks = fmt.chunk_keys(self.meta.get("vpp"))
        self._where: dict[int, tuple[int, str, int]] = {}
        for pp_rank in range(self.pp):
            metas = [self._check_file(tp_rank, pp_rank, ep_rank) for ep_rank in range(self.ep)
                     for tp_rank in range(self.tp)]
            for tp_rank, meta in enumerate(metas):
                if meta["layer_ids"] != metas[0]["layer_ids"]:
                    raise ValueError(f"{self.path(tp_rank % self.tp, pp_rank, tp_rank // self.tp)}"
                                     f": layer_ids differ from "
                                     f"{self.path(0, pp_rank)}")
            for chunk, ids in metas[0]["layer_ids"].items():
                for local, layer_id in enumerate(ids):
                    if layer_id in self._where:
                        raise ValueError(f"{root}: layer {layer_id} is saved twice")
                    self._where[layer_id] = (pp_rank, chunk, local)
        missing = sorted(set(range(self.model_config.num_layers)) - set(self._where))
        if missing:
            raise ValueError(f"{root}: the rank files hold no layer(s) {missing}")

    def path(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> str:
        return fmt.rank_file_path(self.root, self.iteration, tp_rank, pp_rank, self.pp, ep_rank,
                                 self.ep)

    def _check_file(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict[str, Any]:
        path = self.path(tp_rank, pp_rank, ep_rank)
        if self._legacy is not None:
            return self._legacy[tp_rank, pp_rank]
        meta = fmt.validate_meta(fmt.load_rank_file(path).get("mindlora"), path)
        for field in ("kind", "tp", "pp", "ep", "model_config"):
            if meta.get(field) != self.meta.get(field):
                raise ValueError(f"{path}: {field} {meta.get(field)!r} differs from the other "
                                 f"rank files' {self.meta.get(field)!r}")
        if self.ep > 1 and meta.get("ep_rank") != ep_rank:
            raise ValueError(f"{path}: holds expert-parallel rank {meta.get('ep_rank')}, not "
                             f"{ep_rank} as its directory name says")
        return meta

    def _stage(self, pp_rank: int, ep_rank: int = 0) -> list[dict[str, Any]]:
        """Every TP rank's payload of one stage (memory-mapped; dropped by the caller), chunk
        state dicts in mindlora's key dialect (megatron_lm.normalize_keys)."""
        out = []
        for t in range(self.tp):
            path = self.path(t, pp_rank, ep_rank)
            payload = fmt.load_rank_file(path)
            out.append({k: normalize_keys(v, path) if k in self._chunks else v
                        for k, v in payload.items()})
        return out

    def full_layer(self, layer_id: int, meta: bool = False) -> dict[str, torch.Tensor]:
        """Full tensors of global layer ``layer_id``, keyed relative to ``decoder.layers.{i}.``.

        Args:
            meta: return ``meta`` tensors (shape and dtype only; no data is read).
        """
        if layer_id not in self._where:
            raise KeyError(f"{self.root}: no layer {layer_id}")
        pp_rank, chunk, local = self._where[layer_id]
        prefix = f"decoder.layers.{local}."
        n_local = experts_per_rank(self.model_config.num_moe_experts or 0, self.ep)
        out = {}
        for ep_rank in range(self.ep):
            payloads = self._stage(pp_rank, ep_rank)
            for key in payloads[0][chunk]:
                if not key.startswith(prefix) or (self.kind == "adapter"
                                                  and not is_lora_key(key)):
                    continue
                name = expert_global_key(key[len(prefix):], ep_rank, n_local)
                if ep_rank and name == key[len(prefix):]:
                    continue  # non-expert tensors: every EP rank holds the same copy
                shards = [p[chunk][key] for p in payloads]
                if meta:
                    shards = [s.to("meta") for s in shards]
                out[name] = gather(shards, split_rule(key))
        return out

    def global_keys(self) -> list[str]:
        """Keys :meth:`full_global` serves (none for adapters; no output layer when tied)."""
        if self.kind != "base":
            return []
        keys = list(GLOBAL_KEYS)
        return keys[:2] if self.model_config.tie_word_embeddings else keys

    def full_global(self, key: str, meta: bool = False) -> torch.Tensor:
        """Full embedding / final norm / output layer, vocabulary rows unpadded."""
        first = key.startswith("embedding.")
        pp_rank = 0 if first else self.pp - 1
        chunk = self._chunks[0] if first else self._chunks[-1]
        payloads = self._stage(pp_rank)
        if key not in payloads[0][chunk]:
            raise ValueError(f"{self.path(0, pp_rank)} has no {key}")
        shards = [p[chunk][key] for p in payloads]
        if meta:
            shards = [s.to("meta") for s in shards]
        full = gather(shards, split_rule(key))
        if key in VOCAB_KEYS:
            full = full[: self.model_config.vocab_size]
        return full

    def hf_assets_dir(self) -> Optional[str]:
        """The HF config/tokenizer files saved beside the weights (or the --hf-cfg-dir given
        for a Megatron-LM checkpoint), if any."""
        path = os.path.join(self.root, HF_ASSETS)
        if os.path.isdir(path):
            return path
        if self.hf_config_dir and os.path.isfile(os.path.join(self.hf_config_dir, "config.json")):
            return self.hf_config_dir
        return None


HF_ASSETS = "hf_assets"
"""Sub-directory of a converted checkpoint keeping the HF config.json and tokenizer files."""


class MegatronWriter:
    """Sink writing full layers into a TP x PP layout, one streamed rank file per (TP, PP) rank."""

    def __init__(self, root: str, kind: str, model_config: ModelConfig, tp: int, pp: int,
                 num_layer_list: Optional[list[int]], params_dtype: torch.dtype,
                 lora_config: Optional[LoRAConfig] = None, iteration: fmt.Iteration = 1,
                 ep: int = 1, key_style: str = "mindlora") -> None:
        self.root, self.kind, self.cfg = root, kind, model_config
        self.key_style = key_style
        self.tp, self.pp, self.ep, self.iteration = tp, pp, ep, iteration
        ids = layer_ids(layer_counts(model_config.num_layers, pp, num_layer_list=num_layer_list))
        self.stages = [ids[p, 0] for p in range(pp)]
        self.stage_of = {i: (p, j) for p, ids in enumerate(self.stages) for j, i in enumerate(ids)}
        self.padded_vocab = pad_vocab(model_config.vocab_size, tp)
        self.params_dtype, self.lora_config = params_dtype, lora_config
        self.files: dict[tuple[int, int, int], StreamingRankFile] = {}

    def _global_targets(self, key: str) -> list[tuple[int, str]]:
        """(pp rank, key written) for a global tensor; a tied head is copied to the last stage."""
        if key.startswith("embedding."):
            out = [(0, key)]
            if self.cfg.tie_word_embeddings and self.pp > 1:
                out.append((self.pp - 1, "output_layer.weight"))
            return out
        return [(self.pp - 1, key)]

    def plan(self, layers: dict[int, dict[str, torch.Tensor]],
             globals_: dict[str, torch.Tensor]) -> None:
        """Lay out every rank file from meta tensors (shapes and dtypes of the full tensors).

        File order follows the model: embedding, layers, final norm, output layer.
        """
        embedding = GLOBAL_KEYS[0]
        entries: dict[int, list[tuple[str, torch.Tensor]]] = {p: [] for p in range(self.pp)}
        if embedding in globals_:
            entries[0].append((embedding, globals_[embedding]))
        for layer_id in sorted(layers):
            p, j = self.stage_of[layer_id]
            entries[p] += [(f"decoder.layers.{j}.{k}", v) for k, v in layers[layer_id].items()]
        last = entries[self.pp - 1]
        last += [(k, globals_[k]) for k in GLOBAL_KEYS[1:] if k in globals_]
        if embedding in globals_ and self.cfg.tie_word_embeddings and self.pp > 1:
            last.append(("output_layer.weight", globals_[embedding]))  # see _global_targets
        for p in range(self.pp):
            for e in range(self.ep):
                for t in range(self.tp):
                    self._plan_file(p, t, e, self._ep_local(entries[p], e))

    def _ep_local(self, entries: list[tuple[str, torch.Tensor]], ep_rank: int
                  ) -> list[tuple[str, torch.Tensor]]:
        """The entries EP rank ``ep_rank`` holds: shared tensors and its experts (renumbered)."""
        if self.ep == 1:
            return entries
        out = []
        for key, value in entries:
            owner, local = expert_owner(key, self.cfg.num_moe_experts, self.ep)
            if owner in (-1, ep_rank):
                out.append((local, value))
        return out

    def _plan_file(self, p: int, t: int, e: int, entries: list[tuple[str, torch.Tensor]]
                   ) -> None:
        state = {k: shard_tensor(k, v, self.tp, t, self.padded_vocab) for k, v in entries}
        meta = fmt.build_meta(self.kind, self.cfg, self.tp, self.pp, None,
                             {"model": self.stages[p]}, self.padded_vocab, self.params_dtype,
                             self.lora_config, tp_rank=t, pp_rank=p, ep=self.ep, ep_rank=e)
        iteration = 0 if self.iteration == "release" else self.iteration
        args = megatron_args(self.kind, self.cfg, self.tp, self.pp, None,
                             [len(ids) for ids in self.stages], self.padded_vocab,
                             self.params_dtype, self.lora_config, iteration, ep=self.ep)
        skeleton = {"model": to_key_style(state, self.key_style), "args": args,
                    "checkpoint_version": fmt.CHECKPOINT_VERSION, "iteration": iteration,
                    "mindlora": meta}
        path = fmt.rank_file_path(self.root, self.iteration, t, p, self.pp, e, self.ep)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.files[p, t, e] = StreamingRankFile(path, skeleton)

    def write_global(self, key: str, full: torch.Tensor) -> None:
        for p, k in self._global_targets(key):
            for e in range(self.ep):
                for t in range(self.tp):
                    self.files[p, t, e].write({("model", k): shard_tensor(
                        k, full, self.tp, t, self.padded_vocab)})

    def _key(self, key: str) -> str:
        return next(iter(to_key_style({key: None}, self.key_style)))

    def write_layer(self, layer_id: int, full: dict[str, torch.Tensor]) -> None:
        """Write one layer, one shard at a time (memory: the layer plus one shard)."""
        p, j = self.stage_of[layer_id]
        for e in range(self.ep):
            for key, value in self._ep_local(list(full.items()), e):
                for t in range(self.tp):
                    self.files[p, t, e].write({("model", self._key(f"decoder.layers.{j}.{key}")):
                                               shard_tensor(key, value, self.tp, t)})

    def finish(self) -> None:
        for f in self.files.values():
            f.close()
        fmt.write_tracker(self.root, self.iteration)
