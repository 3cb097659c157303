"""Training on a Megatron-LM / MindSpeed-LLM checkpoint: same losses as on mindlora's own.

The base weights are resharded to TP2 x PP2 by convert_ckpt.py, then rewritten the way
Megatron-LM writes them (tests/checkpoint/megatron_lm_files.py: ``args`` Namespace, TE key
names, Megatron vocab padding with garbage rows, no true vocab size in args). The true vocabulary
comes from config.json in the ``--tokenizer-name-or-path`` folder. Both runs use TP2 x PP2 in one
spawned group and must give the same per-iteration losses and grad norms.
"""
import json
import os

import pytest

from mindlora.models.families import get_family
from tests.checkpoint.conftest import run_convert
from tests.checkpoint.megatron_lm_files import to_megatron_lm
from tests.distributed.harness import spawn
from tests.training.fixtures import preprocess_alpaca, tiny_model, write_base_checkpoint

LAYOUT = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]


def _flags(base, data, tok, extra=()):
    return ["--load", base, "--data-path", data, "--micro-batch-size", "1",
            "--global-batch-size", "8", "--seq-length", "96", "--train-iters", "4",
            "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8", "--log-interval", "100",
            "--no-pad-to-seq-lengths", "--tokenizer-name-or-path", tok, *LAYOUT, *extra]


def _body(rank, world, ours, theirs, data, tok):
    import torch

    from mindlora.training.args import parse_args
    from mindlora.training.loop import train

    a = train(parse_args(_flags(ours, data, tok)), log=lambda *_: None)
    b = train(parse_args(_flags(theirs, data, tok)), log=lambda *_: None)
    assert len(a.losses) == 4 and a.losses[-1] < a.losses[0]
    torch.testing.assert_close(torch.tensor(b.losses, dtype=torch.float64),
                               torch.tensor(a.losses, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(b.grad_norms, dtype=torch.float64),
                               torch.tensor(a.grad_norms, dtype=torch.float64), rtol=1e-6,
                               atol=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_lm")
    data, vocab = preprocess_alpaca(str(root / "alpaca"), n=48)
    tok = str(root / "alpaca" / "tokenizer")
    model = tiny_model(vocab_size=((vocab + 63) // 64) * 64)
    with open(os.path.join(tok, "config.json"), "w") as f:  # the HF model folder's config
        json.dump(get_family(model.family).hf_config_from_model(model, "float32"), f)
    base = write_base_checkpoint(str(root / "base"), model)
    ours = str(root / "tp2pp2")
    run_convert(load_model_type="mg", save_model_type="mg", load_dir=base, save_dir=ours,
                target_tensor_parallel_size=2, target_pipeline_parallel_size=2)
    theirs = to_megatron_lm(ours, str(root / "megatron_lm"))
    return ours, theirs, data, tok


def test_megatron_lm_base_trains_like_the_converted_one(setup):
    spawn(_body, 4, *setup)


def test_megatron_lm_base_without_config_json_is_refused(setup, tmp_path):
    from mindlora.training.args import parse_args
    from mindlora.training.loop import resolve_model

    ours, theirs, data, tok = setup
    flags = _flags(theirs, data, tok)
    flags[flags.index("--tokenizer-name-or-path") + 1] = str(tmp_path)  # no config.json here
    with pytest.raises(ValueError, match=r"true vocabulary size is unknown.*"
                                         r"--tokenizer-name-or-path in training"):
        resolve_model(parse_args(flags))
