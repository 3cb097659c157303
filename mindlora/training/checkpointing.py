"""Adapter-only checkpoints: atomic saves and exact resume.

A save holds, per (TP rank, PP rank), the LoRA factors of that rank's chunks, the optimizer and
loss-scaler state, RNG states, the iteration and the data position, plus the ``mindlora`` metadata
(model and LoRA configs, layout) of ``mindlora.checkpoint.megatron_format``. The base weights are
never written.

Crash safety: every writer puts its file under ``<save>/.iter_XXXXXXX.tmp/`` (temp file, fsync,
rename, fsync of the directory); the ranks agree that all writes succeeded (a failed write, e.g.
a full disk, fails every rank with one message and leaves the previous checkpoint untouched);
rank 0 then publishes the directory and the tracker (``durable.publish``).

RNG: data-parallel ranks draw different dropout masks once their batches differ (different
samples, and lengths with ``--no-pad-to-seq-lengths``), so each DP rank's RNG state is saved
(Megatron's layout: a list indexed by DP rank in the DP-rank-0 file) and restored to that rank.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mindlora.checkpoint import loading
from mindlora.checkpoint import megatron_format as fmt
from mindlora.checkpoint.megatron_lm import megatron_args
from mindlora.config import LoRAConfig, ModelConfig, ParallelConfig
from mindlora.lora.factors import is_lora_key
from mindlora.parallel.layout import (chunk_layer_ids, pad_vocab, parallel_layer_counts,
                                      stage_totals)
from mindlora.runtime.files import fsync_dir
from mindlora.runtime.rng import capture_rng_state, restore_rng_state
from mindlora.training import durable


@dataclass
class TrainState:
    """Where a run stands: restored exactly on resume."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0


def _lora_state(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in chunk.state_dict().items() if is_lora_key(k)}


def _rng_state() -> dict:
    """Every RNG stream of the run (CPU, all accelerator devices, megatron's tracker)."""
    return capture_rng_state()


def _set_rng_state(state: dict) -> None:
    restore_rng_state(state)


def _dp_rng_states() -> list[dict]:
    """Every data-parallel rank's RNG state, indexed by DP rank (collective over DP)."""
    states: list = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(states, _rng_state(), group=parallel_state.get_data_parallel_group())
    return states


def save_adapter(save_dir: str, state: TrainState, chunks: list[torch.nn.Module],
                 optimizer: torch.optim.Optimizer, scaler_state: dict, model: ModelConfig,
                 lora: LoRAConfig, parallel: ParallelConfig, params_dtype: torch.dtype,
                 keep: Optional[int] = None) -> str:
    """Write the adapter checkpoint of ``state.iteration`` (collective: every rank calls it).

    Args:
        keep: keep only the newest ``keep`` checkpoints (``--save-total-limit``).
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp = parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size
    name = fmt.iteration_dir_name(state.iteration)
    tmp_root = os.path.join(save_dir, f".{name}.tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp_root, ignore_errors=True)
        os.makedirs(tmp_root, exist_ok=True)
    dist.barrier()
    rng_states = _dp_rng_states()
    failure = ""
    ep = parallel.expert_model_parallel_size
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    # With EP, each EP rank writes its own experts: the writer is expert-data-parallel rank 0.
    writer = (parallel_state.get_expert_data_parallel_rank() if ep > 1
              else parallel_state.get_data_parallel_rank()) == 0
    if writer:
        keys = fmt.chunk_keys(vpp)
        meta = fmt.build_meta(
            "adapter", model, parallel.tensor_model_parallel_size, pp, vpp,
            {k: chunk_layer_ids(model, parallel, pp_rank, v) for v, k in enumerate(keys)},
            pad_vocab(model.vocab_size, parallel.tensor_model_parallel_size), params_dtype, lora,
            tp_rank=tp_rank, pp_rank=pp_rank, ep=ep, ep_rank=ep_rank)
        payload = {k: _lora_state(c) for k, c in zip(keys, chunks)}
        payload["args"] = megatron_args(
            "adapter", model, parallel.tensor_model_parallel_size, pp, vpp,
            stage_totals(parallel_layer_counts(model, parallel)),
            pad_vocab(model.vocab_size, parallel.tensor_model_parallel_size), params_dtype, lora,
            state.iteration, ep=ep)  # what Megatron-LM / MindSpeed-LLM tools read
        payload.update({
            "checkpoint_version": fmt.CHECKPOINT_VERSION, "iteration": state.iteration,
            "mindlora": meta, "optimizer": optimizer.state_dict(), "loss_scaler": scaler_state,
            "rng_state": rng_states, "train_state": vars(state).copy(),
        })
        payload["content_sha256"] = loading.content_digest(payload)
        path = os.path.join(tmp_root, fmt.rank_dir_name(tp_rank, pp_rank, pp, ep_rank, ep),
                            fmt.RANK_FILE)
        try:
            fmt.write_rank_file(path, payload)
            fsync_dir(os.path.dirname(path))
            durable.fault_point("rank_file_written", path)
        except OSError as e:
            failure = f"{path}: {e.strerror or e}"
    _raise_if_any_failed(failure, save_dir, tmp_root, state.iteration)
    final = os.path.join(save_dir, name)
    if dist.get_rank() == 0:
        durable.publish(save_dir, tmp_root, final, state.iteration)
        if keep:
            durable.prune(save_dir, keep)
    dist.barrier()
    return final


def _raise_if_any_failed(failure: str, save_dir: str, tmp_root: str, iteration: int) -> None:
    """All ranks learn whether any write failed; then every rank raises the same kind of error."""
    backend = dist.get_backend()
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else
              torch.device("npu", torch.npu.current_device()) if backend == "hccl" else
              torch.device("cpu"))  # collectives take tensors on their backend's device
    flag = torch.tensor([1.0 if failure else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp_root, ignore_errors=True)
    dist.barrier()  # every rank reports the failure only once nothing half-written is left
    try:
        previous = f"iteration {fmt.read_tracker(save_dir)}"
    except (OSError, ValueError):
        previous = "none"
    where = failure or "another rank failed to write its part"
    raise durable.CheckpointWriteError(
        f"saving checkpoint iteration {iteration} to {save_dir} failed: {where}; the previous "
        f"checkpoint ({previous}) is untouched")


def load_adapter(lora_load: str, chunks: list[torch.nn.Module],
                 optimizer: Optional[torch.optim.Optimizer], model: ModelConfig,
                 lora: LoRAConfig, parallel: ParallelConfig, finetune: bool,
                 hf_config_dir: Optional[str] = None, load_rng: bool = True
                 ) -> tuple[TrainState, Optional[dict]]:
    """Restore an adapter checkpoint; returns (train state, loss-scaler state or None).

    With ``finetune`` only the weights are taken (from any TP x PP layout, resharded) and the run
    starts at iteration 0. Otherwise the run continues exactly, which needs the same TP x PP
    layout (the data-parallel size may change). A MindSpeed-LLM / Megatron-LM LoRA checkpoint
    (``args``, ``lora_A.default.weight`` keys) is read with ``finetune`` only.
    ``optimizer=None`` (``--no-load-optim``) leaves the optimizer and loss scaler fresh;
    ``load_rng=False`` (``--no-load-rng``) the RNG states. With another DP size, DP rank r takes
    the state saved by rank r mod (saved DP size): the ranks then see other samples, so dropout
    masks cannot continue the old run's anyway.
    """
    if finetune:
        loading.load_adapter_weights(lora_load, chunks, model, lora, parallel, hf_config_dir)
        return TrainState(), None
    iteration, meta = loading.read_adapter_meta(lora_load, model, lora, hf_config_dir)
    if meta.get("source") == "megatron":
        raise ValueError(f"--lora-load {lora_load} is a MindSpeed-LLM / Megatron-LM LoRA "
                         f"checkpoint: its optimizer and RNG state are not mindlora's, so it can "
                         f"only start a new run from its weights: add --finetune")
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    keys = fmt.chunk_keys(vpp)
    ep = parallel.expert_model_parallel_size
    same_layout = ((meta["tp"], meta["pp"], meta.get("vpp"), meta.get("ep", 1))
                   == (tp, pp, vpp, ep))
    if not same_layout:
        raise ValueError(
            f"--lora-load {lora_load} was saved with TP={meta['tp']} PP={meta['pp']} "
            f"VPP={meta.get('vpp')}; this run uses TP={tp} PP={pp} VPP={vpp}. An exact resume "
            f"(optimizer state included) needs the same TP x PP layout (data parallel may "
            f"differ). Use the saved layout, or add --finetune to start a new run from the "
            f"adapter weights, which are resharded to any layout.")
    path = fmt.rank_file_path(lora_load, iteration, tp_rank, pp_rank, pp,
                              parallel_state.get_expert_model_parallel_rank(), ep)
    payload = fmt.load_rank_file(path, mmap=False)
    loading.verify_content(payload, path)
    for key, chunk in zip(keys, chunks):
        loading.load_lora_weights(chunk, payload[key], path)
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if load_rng:
        saved = payload["rng_state"]
        saved = saved if isinstance(saved, list) else [saved]  # files from before per-DP states
        _set_rng_state(saved[parallel_state.get_data_parallel_rank() % len(saved)])
    state = TrainState(**payload["train_state"])
    return state, payload.get("loss_scaler") if optimizer is not None else None
