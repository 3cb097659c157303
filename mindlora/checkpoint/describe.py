"""What a checkpoint directory holds, whoever wrote it: mindlora or Megatron-LM / MindSpeed-LLM.

The one dispatch between the two readers. mindlora's rank files describe themselves (``mindlora``
metadata, :mod:`megatron_format`); Megatron-LM's carry only ``args``, from which
:class:`megatron_lm.LegacyLayout` derives the same metadata. Living above both keeps the arrow one
way: megatron_lm reads files with megatron_format's helpers, and neither calls back.
"""
from __future__ import annotations

from typing import Any, Optional

from mindlora.checkpoint import megatron_format as fmt
from mindlora.checkpoint.megatron_lm import LegacyLayout, args_dict, is_foreign, moe_refusal


def read_checkpoint_meta(load_dir: str, iteration: Optional[fmt.Iteration] = None,
                         hf_config_dir: Optional[str] = None
                         ) -> tuple[fmt.Iteration, dict[str, Any]]:
    """(iteration, metadata of rank file TP0/PP0) of the checkpoint in ``load_dir``; see
    :func:`describe_checkpoint`."""
    iteration, metas = describe_checkpoint(load_dir, iteration, hf_config_dir)
    return iteration, metas[0, 0]


def describe_checkpoint(load_dir: str, iteration: Optional[fmt.Iteration] = None,
                        hf_config_dir: Optional[str] = None
                        ) -> tuple[fmt.Iteration, dict[tuple[int, int], dict[str, Any]]]:
    """(iteration, metadata by (tp_rank, pp_rank)) of the checkpoint in ``load_dir``: every rank
    file's for a Megatron-LM one (its layout scan opens them all, once), rank file TP0/PP0's
    (key ``(0, 0)``) for mindlora's, whose files each carry their own.

    A Megatron-LM / MindSpeed-LLM checkpoint (``args``, no ``mindlora``) gets the same metadata,
    derived by :class:`mindlora.checkpoint.megatron_lm.LegacyLayout` (``meta["source"]`` is
    ``"megatron"``).

    Args:
        iteration: which iteration; default: the one ``latest_checkpointed_iteration.txt`` names.
        hf_config_dir: folder of the HF config.json that fills in what Megatron ``args`` lack
            (rope scaling, true vocab size); unused for mindlora checkpoints.
    """
    if iteration is None:
        iteration = fmt.read_tracker(load_dir)
    path = fmt.first_rank_path(load_dir, iteration)
    payload = fmt.load_rank_file(path)
    if is_foreign(payload):
        refusal = moe_refusal(args_dict(payload, path))
        if refusal:
            raise ValueError(f"{path}: {refusal}")
        return iteration, LegacyLayout(load_dir, iteration, hf_config_dir).metas
    return iteration, {(0, 0): fmt.validate_meta(payload.get("mindlora"), path)}
