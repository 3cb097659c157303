"""Training on a Megatron-LM / MindSpeed-LLM checkpoint: same losses as on mindlora's own.

A random Qwen2-style HF model (GQA, qkv bias) is converted to TP2 x PP2 by convert_ckpt.py, and
that checkpoint rewritten the way Megatron-LM writes it (tests/checkpoint/megatron_lm_files.py: ``args`` Namespace, TE key
names, Megatron vocab padding with garbage rows, no true vocab size in args). The true vocabulary
comes from config.json in the ``--tokenizer-name-or-path`` folder. Both runs use TP2 x PP2 in one
spawned group and must give the same per-iteration losses and grad norms. Likewise a MindSpeed-LLM
LoRA checkpoint (``lora_A.default.weight`` keys, ``lora_r``/``lora_alpha`` in args) restarts
training with ``--finetune`` exactly like the mindlora adapter it was made from.
"""
import os
import shutil

import pytest

from mindlora.models.families import get_family
from mindlora.config import LoRAConfig
from tests.checkpoint.conftest import random_adapter, run_convert, write_adapter
from tests.checkpoint.megatron_lm_files import to_megatron_lm
from tests.distributed.harness import spawn
from tests.training.fixtures import preprocess_alpaca, tiny_model

LAYOUT = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]


def _flags(base, data, tok, extra=()):
    return ["--load", base, "--data-path", data, "--micro-batch-size", "1",
            "--global-batch-size", "8", "--seq-length", "96", "--train-iters", "4",
            "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8", "--log-interval", "100",
            "--no-pad-to-seq-lengths", "--tokenizer-name-or-path", tok, *LAYOUT, *extra]


def _same(a, b):
    import torch

    for x, y in ((a.losses, b.losses), (a.grad_norms, b.grad_norms)):
        torch.testing.assert_close(torch.tensor(y, dtype=torch.float64),
                                   torch.tensor(x, dtype=torch.float64), rtol=1e-6, atol=0)


def _body(rank, world, ours, theirs, data, tok, lora_ours, lora_theirs):
    from mindlora.training.args import parse_args
    from mindlora.training.loop import train

    a = train(parse_args(_flags(ours, data, tok)), log=lambda *_: None)
    b = train(parse_args(_flags(theirs, data, tok)), log=lambda *_: None)
    assert len(a.losses) == 4 and a.losses[-1] < a.losses[0]
    _same(a, b)
    c = train(parse_args(_flags(ours, data, tok, ["--lora-load", lora_ours, "--finetune"])),
              log=lambda *_: None)
    d = train(parse_args(_flags(theirs, data, tok, ["--lora-load", lora_theirs, "--finetune"])),
              log=lambda *_: None)
    assert abs(c.losses[0] - a.losses[0]) > 1e-3  # the adapter was really loaded
    _same(c, d)
    with pytest.raises(ValueError, match=r"MindSpeed-LLM / Megatron-LM LoRA checkpoint: .* "
                                         r"add --finetune"):
        train(parse_args(_flags(theirs, data, tok, ["--lora-load", lora_theirs])),
              log=lambda *_: None)


def _hf_model(model, path):
    """A random HF model of ``model``'s shape (transformers' own init plus noise)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = get_family(model.family).hf_config_from_model(model, "float32")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(Qwen2Config(**config)).float()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_lm")
    data, vocab = preprocess_alpaca(str(root / "alpaca"), n=48)
    tok = str(root / "alpaca" / "tokenizer")
    model = tiny_model(vocab_size=((vocab + 63) // 64) * 64)
    hf = str(root / "hf")
    _hf_model(model, hf)
    shutil.copy(os.path.join(hf, "config.json"), tok)  # training finds config.json here
    ours = str(root / "tp2pp2")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=hf, save_dir=ours,
                model_type_hf="qwen2", target_tensor_parallel_size=2,
                target_pipeline_parallel_size=2)
    theirs = to_megatron_lm(ours, str(root / "megatron_lm"))
    lora = LoRAConfig(r=4, alpha=8.0)
    lora_ours = write_adapter(str(root / "lora_ours"), model, lora,
                              random_adapter(model, lora, seed=5), tp=2, pp=2)
    lora_theirs = to_megatron_lm(lora_ours, str(root / "lora_theirs"), lora_args={
        "lora_r": 4, "lora_alpha": 8, "lora_target_modules": list(lora.target_modules)})
    return ours, theirs, data, tok, lora_ours, lora_theirs


def test_megatron_lm_base_trains_like_the_converted_one(setup):
    spawn(_body, 4, *setup)


def test_megatron_lm_base_without_config_json_is_refused(setup, tmp_path):
    from mindlora.training.args import parse_args
    from mindlora.training.loop import resolve_model

    ours, theirs, data, tok = setup[:4]
    flags = _flags(theirs, data, tok)
    flags[flags.index("--tokenizer-name-or-path") + 1] = str(tmp_path)  # no config.json here
    with pytest.raises(ValueError, match=r"true vocabulary size is unknown.*"
                                         r"--tokenizer-name-or-path in training"):
        resolve_model(parse_args(flags))
