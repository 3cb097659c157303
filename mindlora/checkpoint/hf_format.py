"""Hugging Face model folders as a source and a sink of full megatron-core tensors.

The source reads config.json, finds every shard through ``model.safetensors.index.json`` (all
checked before anything is written), and turns HF tensors into full megatron-core tensors one
layer at a time with the family's key map. The sink does the reverse into streamed safetensors
shards plus an index, config.json and the tokenizer files.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterator, Optional

import torch

from mindlora.checkpoint.safetensors_io import SafetensorsFile, StreamingSafetensorsWriter
from mindlora.config import ModelConfig
from mindlora.models.families import Family, family_for_hf_config
from mindlora.models.families.base import HF_LAYER_PREFIX, to_hf, to_mcore

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf", ".ckpt")
_IGNORED = ("rotary_emb.inv_freq",)


def read_hf_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --load-dir must be a Hugging Face model folder")
    with open(path) as f:
        return json.load(f)


def copy_assets(src: str, dst: str) -> list[str]:
    """Copy every non-weight file (config, tokenizer, generation config, chat template...)."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (os.path.isfile(path) and not name.endswith(_WEIGHT_SUFFIXES)
                and not name.endswith(".index.json") and not name.startswith(".")):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def _open_shards(directory: str) -> tuple[dict[str, SafetensorsFile], dict[str, str]]:
    """(file name -> opened file, tensor key -> file name); every shard checked for truncation."""
    index_path = os.path.join(directory, INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = {}
        for name in sorted(set(weight_map.values())):
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard {path} listed in {index_path} is missing")
            files[name] = SafetensorsFile(path)
        for key, name in weight_map.items():
            if key not in files[name].entries:
                raise ValueError(f"{index_path} puts {key} in {name}, which does not hold it")
        return files, weight_map
    single = os.path.join(directory, SINGLE)
    if os.path.isfile(single):
        f = SafetensorsFile(single)
        return {SINGLE: f}, {k: SINGLE for k in f.entries}
    bins = [n for n in os.listdir(directory) if n.endswith(".bin")]
    hint = (" (only PyTorch .bin weights found; re-save with safe_serialization=True)"
            if bins else "")
    raise FileNotFoundError(f"no {INDEX} or {SINGLE} in {directory}{hint}")


class HFSource:
    """Full megatron-core tensors read from a Hugging Face model folder."""

    kind = "base"
    lora_config = None

    def __init__(self, directory: str, family_name: str) -> None:
        self.directory = directory
        self.hf_config = read_hf_config(directory)
        self.family: Family = family_for_hf_config(family_name, self.hf_config,
                                                   os.path.join(directory, "config.json"))
        self.model_config: ModelConfig = self.family.model_config_from_hf(self.hf_config)
        self._files, self._where = _open_shards(directory)
        self._check_keys()
        self.params_dtype = self._tensor("model.embed_tokens.weight", True).dtype

    def _expected(self) -> list[str]:
        cfg = self.model_config
        keys = [k for m in self.family.global_maps(cfg) for k in m.hf]
        for i in range(cfg.num_layers):
            keys += [HF_LAYER_PREFIX.format(i) + k for m in self.family.layer_maps(cfg)
                     for k in m.hf]
        return keys

    def _check_keys(self) -> None:
        expected = self._expected()
        missing = [k for k in expected if k not in self._where]
        extra = set(self._where) - set(expected)
        if self.model_config.tie_word_embeddings:
            extra.discard("lm_head.weight")  # some exporters save the tied copy anyway
        extra = sorted(k for k in extra if not k.endswith(_IGNORED))
        if missing or extra:
            raise ValueError(
                f"{self.directory} does not hold a {self.family.name} model as its config.json "
                f"describes (is --model-type-hf right?): "
                + (f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}; " if missing else "")
                + (f"{len(extra)} unexpected, e.g. {extra[:3]}" if extra else ""))

    def _tensor(self, key: str, meta: bool) -> torch.Tensor:
        f = self._files[self._where[key]]
        return f.meta(key) if meta else f.get(key)

    def full_layer(self, layer_id: int, meta: bool = False) -> dict[str, torch.Tensor]:
        """Full tensors of layer ``layer_id`` keyed relative to ``decoder.layers.{i}.``."""
        prefix = HF_LAYER_PREFIX.format(layer_id)
        return {m.mcore: to_mcore(m, [self._tensor(prefix + k, meta) for k in m.hf],
                                  self.model_config)
                for m in self.family.layer_maps(self.model_config)}

    def global_keys(self) -> list[str]:
        return [m.mcore for m in self.family.global_maps(self.model_config)]

    def full_global(self, key: str, meta: bool = False) -> torch.Tensor:
        (m,) = [m for m in self.family.global_maps(self.model_config) if m.mcore == key]
        return to_mcore(m, [self._tensor(k, meta) for k in m.hf], self.model_config)

    def hf_assets_dir(self) -> str:
        return self.directory


class HFWriter:
    """Sink writing full megatron-core tensors as an HF folder (streamed shards + index).

    Args:
        hf_config: the original config.json, kept (with its dtype updated) so fields mindlora does
            not model (token ids, generation defaults) survive; None = generate from the family.
        assets_dir: folder whose tokenizer and other non-weight files are copied.
    """

    def __init__(self, directory: str, family: Family, model_config: ModelConfig,
                 max_shard_bytes: int, dtype: torch.dtype, hf_config: Optional[dict] = None,
                 assets_dir: Optional[str] = None) -> None:
        self.directory, self.family, self.cfg = directory, family, model_config
        self.max_shard_bytes, self.dtype = max_shard_bytes, dtype
        self.hf_config, self.assets_dir = hf_config, assets_dir
        self.writer: Optional[StreamingSafetensorsWriter] = None

    def _to_hf(self, maps: list, full: dict[str, torch.Tensor], prefix: str
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """HF (key, tensor) pairs, one megatron-core tensor at a time (bounded memory)."""
        for m in maps:
            if m.mcore in full:
                yield from zip([prefix + k for k in m.hf], to_hf(m, full[m.mcore], self.cfg))

    def _check_layer(self, layer_id: int, full: dict[str, torch.Tensor]) -> None:
        want = {m.mcore for m in self.family.layer_maps(self.cfg)}
        if set(full) != want:
            raise ValueError(f"layer {layer_id}: tensors {sorted(set(full) ^ want)} do not fit a "
                             f"{self.family.name} model")

    def plan(self, layers: dict[int, dict[str, torch.Tensor]],
             globals_: dict[str, torch.Tensor]) -> None:
        gmaps = self.family.global_maps(self.cfg)
        plan = list(self._to_hf(gmaps[:1], globals_, ""))
        for i in sorted(layers):
            self._check_layer(i, layers[i])
            plan += self._to_hf(self.family.layer_maps(self.cfg), layers[i],
                                HF_LAYER_PREFIX.format(i))
        plan += self._to_hf(gmaps[1:], globals_, "")
        self.writer = StreamingSafetensorsWriter(self.directory, plan, self.max_shard_bytes)

    def write_global(self, key: str, full: torch.Tensor) -> None:
        for k, t in self._to_hf(self.family.global_maps(self.cfg), {key: full}, ""):
            self.writer.write(k, t)

    def write_layer(self, layer_id: int, full: dict[str, torch.Tensor]) -> None:
        self._check_layer(layer_id, full)
        for k, t in self._to_hf(self.family.layer_maps(self.cfg), full,
                                HF_LAYER_PREFIX.format(layer_id)):
            self.writer.write(k, t)

    def finish(self) -> None:
        self.writer.close()
        if self.assets_dir:
            copy_assets(self.assets_dir, self.directory)
        name = str(self.dtype).replace("torch.", "")
        config = self.hf_config
        if config is None or self.family.model_config_from_hf(config) != self.cfg:
            config = self.family.hf_config_from_model(self.cfg, name)
        config = dict(config)
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
        with open(os.path.join(self.directory, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
