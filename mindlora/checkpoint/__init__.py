"""Checkpoints: Megatron-style layout (read/write/reshard), HF folders, PEFT adapters, conversion.

The Megatron-layout API is re-exported here; model weights load through
:mod:`mindlora.checkpoint.loading` (training and generation alike); tools/convert_ckpt.py drives
:func:`mindlora.checkpoint.convert.convert`. See docs/checkpoint.md.
"""
from mindlora.checkpoint.describe import read_checkpoint_meta
from mindlora.checkpoint.megatron_format import (CHECKPOINT_VERSION, RANK_FILE, TRACKER,
                                                 build_meta, chunk_keys, iteration_dir_name,
                                                 load_rank_file, rank_dir_name,
                                                 rank_file_path, read_tracker,
                                                 write_rank_file, write_tracker)

__all__ = ["CHECKPOINT_VERSION", "RANK_FILE", "TRACKER", "build_meta", "chunk_keys",
           "iteration_dir_name", "load_rank_file", "rank_dir_name",
           "rank_file_path", "read_checkpoint_meta", "read_tracker", "write_rank_file",
           "write_tracker"]
