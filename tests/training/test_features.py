"""Recompute, bf16/fp16, evaluation, NaN handling and the CPU pipeline settings."""
import math

import pytest
import torch

from tests.distributed.harness import spawn
from tests.training.fixtures import tiny_model, write_base_checkpoint, write_instruction_data


def _train(base, data, extra, iters=4):
    from mindlora.training.args import parse_args
    from mindlora.training.loop import train

    lines = []
    flags = ["--load", base, "--data-path", data, "--micro-batch-size", "2",
             "--global-batch-size", "4", "--seq-length", "32", "--train-iters", str(iters),
             "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8", "--log-interval", "1",
             "--lora-dropout", "0.1", *extra]
    return train(parse_args(flags), log=lines.append), lines


def _features_body(rank, world, base, data):
    ref, _ = _train(base, data, [])
    # activation recomputation (megatron-core's checkpointing, CPU RNG states) changes nothing
    for extra in (["--recompute-granularity", "full", "--recompute-method", "uniform",
                   "--recompute-num-layers", "1"],
                  ["--recompute-granularity", "full", "--recompute-method", "block",
                   "--recompute-num-layers", "2"],
                  ["--recompute-granularity", "selective"]):
        got, _ = _train(base, data, extra)
        torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses),
                                   rtol=1e-5, atol=0, msg=lambda m: f"{extra}: {m}")
    # bf16 trains close to float32; fp16 runs with a dynamic loss scale
    bf16, _ = _train(base, data, ["--bf16"])
    assert all(math.isfinite(x) for x in bf16.losses)
    torch.testing.assert_close(torch.tensor(bf16.losses), torch.tensor(ref.losses), rtol=3e-2,
                               atol=0)
    fp16, lines = _train(base, data, ["--fp16", "--initial-loss-scale", "1024"])
    assert all(math.isfinite(x) for x in fp16.losses)
    if rank == 0:
        first = next(ln for ln in lines if ln.lstrip().startswith("iteration"))
        assert "loss scale: 1024.0" in first, first
    # evaluation runs the forward-only schedule and logs Megatron's validation block
    _, lines = _train(base, data, ["--split", "80,20,0", "--eval-interval", "2",
                                   "--eval-iters", "1"])
    if rank == 0:
        assert sum("validation loss at iteration" in ln for ln in lines) == 2
    # NaN losses are skipped and counted; too many in a row stop the run with a message
    with pytest.raises(RuntimeError, match="2 consecutive iterations had NaN/Inf"):
        _train(base, data, ["--lr", "1e30", "--clip-grad", "0", "--max-nan-iterations", "2",
                            "--lora-dropout", "0"], iters=20)


def test_recompute_precision_eval_and_nan(tmp_path):
    base = write_base_checkpoint(str(tmp_path / "base"), tiny_model())
    data = write_instruction_data(str(tmp_path / "data" / "sft"), n=40)
    spawn(_features_body, 2, base, data)


def test_cpu_pipeline_config_avoids_batched_p2p():
    """gloo + interleaved PP=2 gave wrong gradients with batched isend/irecv: it is off on CPU
    (the interleaved parity test in test_parity.py is the end-to-end proof)."""
    from mindlora.config import ParallelConfig
    from mindlora.models.builder import transformer_config

    cfg = transformer_config(tiny_model(), ParallelConfig(pipeline_model_parallel_size=2,
                                                          virtual_pipeline_model_parallel_size=2))
    assert cfg.batch_p2p_comm is False
    assert cfg.pipeline_model_parallel_layout is not None
