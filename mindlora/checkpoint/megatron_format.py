"""Megatron-LM's checkpoint layout, as mindlora writes and reads it (base weights and adapters).

``<dir>/latest_checkpointed_iteration.txt`` names an iteration (or ``release``);
``<dir>/iter_0000001/mp_rank_TT[_PPP]/model_optim_rng.pt`` holds one (TP rank, PP rank)'s payload:
``model`` (or ``model0``, ``model1``, ... per virtual chunk, layer indices local to the chunk),
``checkpoint_version``, ``iteration`` and ``mindlora``, a dict of plain metadata (see
:func:`build_meta`) that makes every file self-describing: no flag has to repeat the model's shape
or the layout it was saved with. Payloads hold tensors and plain Python values only, so every load
is ``torch.load(weights_only=True)``; files are opened memory-mapped, so reading one tensor reads
only its pages.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
from typing import Any, Optional, Union

import torch

from mindlora.config import LoRAConfig, ModelConfig
from mindlora.runtime.dtypes import dtype_name
from mindlora.runtime.files import atomic_path

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
FORMAT_VERSION = 1
CHECKPOINT_VERSION = 3.0
KINDS = ("base", "adapter")
Iteration = Union[int, str]

def iteration_dir_name(iteration: Iteration) -> str:
    """``iter_0000001``, or ``release`` for Megatron's release checkpoints."""
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0,
                  ep_size: int = 1) -> str:
    """``mp_rank_TT`` without pipeline parallelism, ``mp_rank_TT_PPP`` with it, plus ``_EEE``
    with expert parallelism (as Megatron)."""
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep_size == 1 else f"{name}_{ep_rank:03d}"


def rank_file_path(root: str, iteration: Iteration, tp_rank: int, pp_rank: int,
                   pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """Path of one rank's ``model_optim_rng.pt``."""
    return os.path.join(root, iteration_dir_name(iteration),
                        rank_dir_name(tp_rank, pp_rank, pp_size, ep_rank, ep_size), RANK_FILE)


def chunk_keys(vpp: Optional[int]) -> list[str]:
    """Payload keys of the model chunks: ``["model"]`` or ``["model0", "model1", ...]``."""
    return ["model"] if not vpp else [f"model{v}" for v in range(vpp)]


def write_tracker(root: str, iteration: Iteration) -> None:
    """Write ``latest_checkpointed_iteration.txt`` (atomically; write it after the rank files)."""
    with atomic_path(os.path.join(root, TRACKER)) as tmp, open(tmp, "w") as f:
        f.write(str(iteration))


def read_tracker(root: str) -> Iteration:
    """The iteration ``latest_checkpointed_iteration.txt`` names."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {root} is not a Megatron-style checkpoint "
                                f"directory (check --load-dir / --lora-load)")
    text = open(path).read().strip()
    if text == "release":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path} must hold an iteration number or 'release', not {text!r}")


def build_meta(kind: str, model_config: ModelConfig, tp: int, pp: int, vpp: Optional[int],
               layer_ids: dict[str, list[int]], padded_vocab_size: int,
               params_dtype: torch.dtype, lora_config: Optional[LoRAConfig] = None,
               tp_rank: Optional[int] = None, pp_rank: Optional[int] = None,
               ep: int = 1, ep_rank: int = 0) -> dict[str, Any]:
    """The ``mindlora`` metadata of one rank file (plain types only).

    Args:
        kind: ``base`` (full weights) or ``adapter`` (lora_A/lora_B tensors only).
        layer_ids: for each chunk key (:func:`chunk_keys`), the global ids of its layers in
            local order.
        padded_vocab_size: rows of the full (TP=1-equivalent) embedding as saved.
    """
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, not {kind!r}")
    if kind == "adapter" and lora_config is None:
        raise ValueError("adapter checkpoints need their lora_config")
    return {
        "format_version": FORMAT_VERSION, "kind": kind, "model_config": model_config.to_dict(),
        "lora_config": lora_config.to_dict() if lora_config is not None else None,
        "tp": tp, "pp": pp, "vpp": vpp, "tp_rank": tp_rank, "pp_rank": pp_rank,
        "layer_ids": {k: [int(i) for i in v] for k, v in layer_ids.items()},
        "padded_vocab_size": padded_vocab_size, "params_dtype": dtype_name(params_dtype),
        **({"ep": ep, "ep_rank": ep_rank} if ep > 1 else {}),
    }


def validate_meta(meta: Any, path: str) -> dict[str, Any]:
    """Check a rank file's ``mindlora`` metadata; return it (ValueError naming ``path`` if bad)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path} has neither 'mindlora' metadata nor Megatron 'args': it was "
                         f"written neither by mindlora nor by Megatron-LM / MindSpeed-LLM. "
                         f"Convert from the Hugging Face model with tools/convert_ckpt.py")
    errors = []
    if meta.get("format_version") != FORMAT_VERSION:
        errors.append(f"format_version {meta.get('format_version')} (this mindlora reads "
                      f"{FORMAT_VERSION})")
    if meta.get("kind") not in KINDS:
        errors.append(f"kind {meta.get('kind')!r}")
    for name in ("model_config", "tp", "pp", "layer_ids", "padded_vocab_size", "params_dtype"):
        if name not in meta:
            errors.append(f"missing field {name!r}")
    if meta.get("kind") == "adapter" and not meta.get("lora_config"):
        errors.append("adapter without lora_config")
    if errors:
        raise ValueError(f"{path}: invalid mindlora metadata: " + "; ".join(errors))
    return meta


def write_rank_file(path: str, payload: dict[str, Any]) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def allow_megatron_args() -> None:
    """Let ``weights_only`` loads read ``argparse.Namespace`` (Megatron's ``args``), as
    megatron-core does on import. Registered for good: torch's ``safe_globals`` context manager
    would, on exit, also drop the registration megatron-core made."""
    allowed = torch.serialization.get_safe_globals()
    missing = [c for c in (argparse.Namespace, io.BytesIO) if c not in allowed]
    if missing:  # BytesIO: transformer-engine's _extra_state in older megatron-core
        torch.serialization.add_safe_globals(missing)


def load_rank_file(path: str, mmap: bool = True) -> dict[str, Any]:
    """Load one rank file with ``weights_only=True`` (memory-mapped by default).

    ``argparse.Namespace`` (Megatron's ``args``) is allowed; a file that needs more (a Megatron-LM
    training checkpoint's numpy RNG state, optimizer config...) is retried once with the safe
    globals megatron-core itself registers on import; anything else is refused here by name.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing checkpoint file {path}")
    allow_megatron_args()
    try:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            from megatron.core.safe_globals import register_safe_globals
            register_safe_globals()
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds Python objects that a weights_only load refuses (only "
                         f"tensors, plain values and Megatron's args are read): "
                         f"{str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): "
                         f"{str(e).splitlines()[0]}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} does not hold a checkpoint dict")
    return payload


def first_rank_path(root: str, iteration: Iteration) -> str:
    """Path of the TP0/PP0/EP0 rank file: ``mp_rank_00``, ``mp_rank_00_000`` (PP or EP) or
    ``mp_rank_00_000_000`` (PP and EP). Which of PP and EP the middle case means is what the file
    itself says (mindlora metadata or Megatron ``args``): mindlora.checkpoint.describe reads it."""
    base = os.path.join(root, iteration_dir_name(iteration))
    for pp, ep in ((1, 1), (2, 1), (2, 2)):
        path = os.path.join(base, rank_dir_name(0, 0, pp, 0, ep), RANK_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"missing checkpoint file {os.path.join(base, 'mp_rank_00', RANK_FILE)}"
                            f" (nor mp_rank_00_000): {root} holds no "
                            f"{iteration_dir_name(iteration)}")
