"""Build this rank's model for generation: base weights (and an adapter) resharded at load.

The architecture comes from the base checkpoint's metadata and the LoRA hyper-parameters from the
adapter's, so no shape or LoRA flag is needed. Loading goes through the very functions training
uses for ``--load`` / ``--lora-load --finetune`` (``mindlora.checkpoint.loading``), so a
checkpoint of any TP x PP layout loads into any other, exactly as for ``--finetune``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch

from mindlora.checkpoint import describe
from mindlora.checkpoint import loading
from mindlora.config import LoRAConfig, ModelConfig, ParallelConfig
from mindlora.models.builder import build_model, transformer_config
from mindlora.runtime import init_parallel


@dataclass
class LoadedModel:
    """This rank's chunks and what they were built from."""

    chunks: list[torch.nn.Module]
    model: ModelConfig
    lora: Optional[LoRAConfig]


def read_model_config(load: str, hf_config_dir: Optional[str] = None) -> ModelConfig:
    """The architecture stored in the base checkpoint ``--load``.

    ``hf_config_dir`` (the tokenizer folder) supplies what a Megatron-LM / MindSpeed-LLM base
    does not record (the true vocabulary size, rope scaling), as in training.
    """
    if not os.path.isdir(load):
        raise FileNotFoundError(f"--load {load}: no such checkpoint directory (convert a Hugging "
                                f"Face model with tools/convert_ckpt.py first)")
    _, meta = describe.read_checkpoint_meta(load, hf_config_dir=hf_config_dir)
    if meta["kind"] != "base":
        raise ValueError(f"--load {load} holds a {meta['kind']} checkpoint, not base weights "
                         f"(pass an adapter with --lora-load)")
    return ModelConfig.from_dict(meta["model_config"])


def read_lora_config(lora_load: str, fold_collectives: bool, hf_config_dir: Optional[str] = None
                     ) -> LoRAConfig:
    """The LoRA hyper-parameters stored in the adapter checkpoint ``--lora-load``."""
    if not os.path.isdir(lora_load):
        raise FileNotFoundError(f"--lora-load {lora_load}: no such adapter checkpoint directory")
    _, meta = describe.read_checkpoint_meta(lora_load, hf_config_dir=hf_config_dir)
    if meta["kind"] != "adapter":
        raise ValueError(f"--lora-load {lora_load} holds a {meta['kind']} checkpoint, not an "
                         f"adapter (pass base weights with --load)")
    lora = LoRAConfig.from_dict(meta["lora_config"])
    return dataclasses.replace(lora, fold_collectives=fold_collectives, dropout=0.0)


def load_for_generation(load: str, lora_load: Optional[str], parallel: ParallelConfig,
                        dtype: torch.dtype = torch.float32, lora_fusion: bool = False,
                        seed: int = 1234, hf_config_dir: Optional[str] = None) -> LoadedModel:
    """Set up the parallel state and load this rank's model chunks (collective).

    Requires torch.distributed to be initialised (``mindlora.runtime.init_distributed``).
    """
    model = read_model_config(load, hf_config_dir)
    lora = read_lora_config(lora_load, lora_fusion, hf_config_dir) if lora_load else None
    parallel.check_model(model)
    # Generation runs without sequence parallelism (see mindlora.generation.engine).
    layout = dataclasses.replace(parallel, sequence_parallel=False)
    init_parallel(layout, seed=seed)
    config = transformer_config(model, layout, dtype)
    chunks = build_model(model, layout, lora, dtype, config)
    loading.load_base(load, chunks, model, layout, hf_config_dir=hf_config_dir)
    if lora_load:
        loading.load_adapter_weights(lora_load, chunks, model, lora, layout, hf_config_dir)
    for c in chunks:
        c.eval()
    return LoadedModel(chunks, model, lora)
