"""Adapter-only checkpoints: atomic saves and exact resume.

A save holds, per (TP rank, PP rank), the LoRA factors of that rank's chunks, the optimizer and
loss-scaler state, RNG states, the iteration and the data position, plus the ``mindlora`` metadata
(model and LoRA configs, layout) of ``mindlora.checkpoint.megatron_format``. The base weights are
never written.

Crash safety: every writer puts its file under ``<save>/.iter_XXXXXXX.tmp/`` (temp file, fsync,
rename, fsync of the directory); the ranks agree that all writes succeeded; rank 0 then moves the
directory into place and only then rewrites ``latest_checkpointed_iteration.txt`` (temp, fsync,
rename). Rewriting an existing iteration swaps the two directories atomically (Linux
``renameat2(RENAME_EXCHANGE)``); where the file system cannot, the old one is renamed aside
first, and if the tracker named it, the tracker is first pointed at the newest other
checkpoint (or removed when there is none). So at no instant does the tracker name a missing or
partial directory; a run killed mid-save leaves at most stale ``.tmp``/``.old`` directories,
removed by the next save. A failed write (disk full ...) fails every rank with one message and
leaves the previous checkpoint untouched.

RNG: data-parallel ranks draw different dropout masks once their batches differ (different
samples, and lengths with ``--no-pad-to-seq-lengths``), so each DP rank's RNG state is saved
(Megatron's layout: a list indexed by DP rank in the DP-rank-0 file) and restored to that rank.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from mindlora.checkpoint import megatron_format as fmt
from mindlora.config import LoRAConfig, ModelConfig, ParallelConfig
from mindlora.models.builder import chunk_layer_ids, padded_vocab_size


@dataclass
class TrainState:
    """Where a run stands: restored exactly on resume."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0


def _is_lora(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def _lora_state(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in chunk.state_dict().items() if _is_lora(k)}


def _chunk_shard(load_dir: str, chunk: torch.nn.Module, vp_stage: int, model: ModelConfig,
                 parallel: ParallelConfig, iteration=None) -> dict[str, torch.Tensor]:
    """This rank's chunk ``vp_stage`` read from a checkpoint of any layout (resharded)."""
    tp = parallel.tensor_model_parallel_size
    return fmt.load_model_shard(
        load_dir, tp, parallel_state.get_tensor_model_parallel_rank(),
        chunk_layer_ids(model, parallel, parallel_state.get_pipeline_model_parallel_rank(),
                        vp_stage),
        chunk.pre_process, chunk.post_process, model.tie_word_embeddings,
        padded_vocab_size(model, tp), iteration=iteration)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointWriteError(OSError):
    """A save failed on some rank (disk full, permissions ...); the previous checkpoint is intact."""


def _hook(stage: str, path: str) -> None:
    """Fault-injection seam for the reliability tests (no-op): called inside a save at ``stage``
    (``rank_file_written`` on every writer, ``renamed_aside`` on rank 0 in the fallback swap)."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    if parallel_state.get_data_parallel_rank() == 0:
        keys = fmt.chunk_keys(vpp)
        meta = fmt.build_meta(
            "adapter", model, parallel.tensor_model_parallel_size, pp, vpp,
            {k: chunk_layer_ids(model, parallel, pp_rank, v) for v, k in enumerate(keys)},
            padded_vocab_size(model, parallel.tensor_model_parallel_size), params_dtype, lora,
            tp_rank=tp_rank, pp_rank=pp_rank)
        payload = {k: _lora_state(c) for k, c in zip(keys, chunks)}
        payload.update({
            "checkpoint_version": fmt.CHECKPOINT_VERSION, "iteration": state.iteration,
            "mindlora": meta, "optimizer": optimizer.state_dict(), "loss_scaler": scaler_state,
            "rng_state": rng_states, "train_state": vars(state).copy(),
        })
        path = os.path.join(tmp_root, fmt.rank_dir_name(tp_rank, pp_rank, pp), fmt.RANK_FILE)
        try:
            fmt.write_rank_file(path, payload)
            _fsync_dir(os.path.dirname(path))
            _hook("rank_file_written", path)
        except OSError as e:
            failure = f"{path}: {e.strerror or e}"
    _raise_if_any_failed(failure, save_dir, tmp_root, state.iteration)
    final = os.path.join(save_dir, name)
    if dist.get_rank() == 0:
        _publish(save_dir, tmp_root, final, state.iteration)
        if keep:
            prune(save_dir, keep)
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
    try:
        previous = f"iteration {fmt.read_tracker(save_dir)}"
    except (OSError, ValueError):
        previous = "none"
    where = failure or "another rank failed to write its part"
    raise CheckpointWriteError(f"saving checkpoint iteration {iteration} to {save_dir} failed: "
                               f"{where}; the previous checkpoint ({previous}) is untouched")


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _iterations(save_dir: str) -> list[int]:
    """Iterations with a published directory (only ever created by renaming a complete one)."""
    out = []
    for entry in os.listdir(save_dir):
        if entry.startswith("iter_") and entry[5:].isdigit():
            out.append(int(entry[5:]))
    return sorted(out)


def _tracked(save_dir: str):
    try:
        return fmt.read_tracker(save_dir)
    except (OSError, ValueError):
        return None


def _publish(save_dir: str, tmp_root: str, final: str, iteration: int) -> None:
    """Move a complete ``tmp_root`` to ``final``, then point the tracker at it (rank 0)."""
    _fsync_dir(tmp_root)
    aside = None
    if not os.path.exists(final):
        os.rename(tmp_root, final)
    elif _exchange(tmp_root, final):
        aside = tmp_root  # now holds the replaced checkpoint
    else:
        aside = f"{tmp_root[:-len('.tmp')]}.old"
        shutil.rmtree(aside, ignore_errors=True)
        if _tracked(save_dir) == iteration:
            older = [i for i in _iterations(save_dir) if i != iteration]
            if older:
                fmt.write_tracker(save_dir, older[-1])
            else:
                os.unlink(os.path.join(save_dir, fmt.TRACKER))
            _fsync_dir(save_dir)
        os.rename(final, aside)
        _hook("renamed_aside", aside)
        os.rename(tmp_root, final)
    _fsync_dir(save_dir)
    fmt.write_tracker(save_dir, iteration)
    _fsync_dir(save_dir)
    if aside:
        shutil.rmtree(aside, ignore_errors=True)


def prune(save_dir: str, keep: int) -> list[int]:
    """Remove all but the newest ``keep`` checkpoints, never the tracked one; returns removed."""
    tracked = _tracked(save_dir)
    removed = []
    for it in _iterations(save_dir)[:-keep]:
        if it != tracked:
            shutil.rmtree(os.path.join(save_dir, fmt.iteration_dir_name(it)))
            removed.append(it)
    for entry in os.listdir(save_dir):  # leftovers of saves killed midway
        if entry.startswith(".iter_") and entry.endswith((".tmp", ".old")):
            shutil.rmtree(os.path.join(save_dir, entry), ignore_errors=True)
    return removed


def _check_compatible(meta: dict, path: str, model: ModelConfig, lora: LoRAConfig) -> None:
    errors = []
    saved_model = ModelConfig.from_dict(meta["model_config"])
    if saved_model != model:
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


def load_adapter(lora_load: str, chunks: list[torch.nn.Module],
                 optimizer: Optional[torch.optim.Optimizer], model: ModelConfig,
                 lora: LoRAConfig, parallel: ParallelConfig, finetune: bool,
                 load_rng: bool = True) -> tuple[TrainState, Optional[dict]]:
    """Restore an adapter checkpoint; returns (train state, loss-scaler state or None).

    With ``finetune`` only the weights are taken (from any TP x PP layout, resharded) and the run
    starts at iteration 0. Otherwise the run continues exactly, which needs the same TP x PP
    layout (the data-parallel size may change). ``optimizer=None`` (``--no-load-optim``) leaves
    the optimizer and loss scaler fresh; ``load_rng=False`` (``--no-load-rng``) the RNG states.
    With another DP size, DP rank r takes the state saved by rank r mod (saved DP size): the
    ranks then see other samples, so dropout masks cannot continue the old run's anyway.
    """
    iteration, meta = fmt.read_meta(lora_load)
    if meta["kind"] != "adapter":
        raise ValueError(f"--lora-load {lora_load} holds a {meta['kind']} checkpoint, not an "
                         f"adapter (pass base weights with --load)")
    _check_compatible(meta, lora_load, model, lora)
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    keys = fmt.chunk_keys(vpp)
    same_layout = (meta["tp"], meta["pp"], meta.get("vpp")) == (tp, pp, vpp)
    if finetune:
        for v, chunk in enumerate(chunks):
            _load_lora_weights(chunk, _chunk_shard(lora_load, chunk, v, model, parallel,
                                                   iteration), lora_load)
        return TrainState(), None
    if not same_layout:
        raise ValueError(
            f"--lora-load {lora_load} was saved with TP={meta['tp']} PP={meta['pp']} "
            f"VPP={meta.get('vpp')}; this run uses TP={tp} PP={pp} VPP={vpp}. An exact resume "
            f"(optimizer state included) needs the same TP x PP layout (data parallel may "
            f"differ). Use the saved layout, or add --finetune to start a new run from the "
            f"adapter weights, which are resharded to any layout.")
    path = fmt.rank_file_path(lora_load, iteration, tp_rank, pp_rank, pp)
    payload = fmt.load_rank_file(path, mmap=False)
    for key, chunk in zip(keys, chunks):
        _load_lora_weights(chunk, payload[key], path)
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if load_rng:
        saved = payload["rng_state"]
        saved = saved if isinstance(saved, list) else [saved]  # files from before per-DP states
        _set_rng_state(saved[parallel_state.get_data_parallel_rank() % len(saved)])
    state = TrainState(**payload["train_state"])
    return state, payload.get("loss_scaler") if optimizer is not None else None


def _load_lora_weights(chunk: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    own = {k for k in chunk.state_dict() if _is_lora(k)}
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
              parallel: ParallelConfig) -> None:
    """Load the frozen base weights of this rank's chunks from a checkpoint of any layout."""
    for v, chunk in enumerate(chunks):
        sd = _chunk_shard(load_dir, chunk, v, model, parallel)
        own = {k for k in chunk.state_dict() if not k.endswith("_extra_state") and not _is_lora(k)}
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
                params[k].copy_(sd[k])
