"""Adapter checkpoints: exact resume, layout changes, base untouched, atomic saves."""
import hashlib
import json
import os

import pytest
import torch

from tests.distributed.harness import spawn
from tests.training.fixtures import tiny_model, write_base_checkpoint, write_instruction_data


def _flags(base, data, iters, extra):
    return ["--load", base, "--data-path", data, "--micro-batch-size", "2",
            "--global-batch-size", "4", "--seq-length", "32", "--train-iters", str(iters),
            "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.2",
            "--log-interval", "100", *extra]


def _train(base, data, iters, extra):
    from mindlora.training.args import parse_args
    from mindlora.training.loop import train

    return train(parse_args(_flags(base, data, iters, extra)), log=lambda *_: None)


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _save_runs_body(rank, world, base, data, root):
    """World 2 (DP2): uninterrupted vs stopped-and-resumed runs, with LoRA dropout 0.2."""
    from mindlora.checkpoint import megatron_format as fmt

    full = _train(base, data, 6, ["--save", f"{root}/full", "--save-interval", "3"])
    stopped = _train(base, data, 6, ["--save", f"{root}/stopped", "--save-interval", "3",
                                     "--exit-interval", "3"])
    assert stopped.state.iteration == 3
    assert fmt.read_tracker(f"{root}/stopped") == 3
    resumed = _train(base, data, 6, ["--lora-load", f"{root}/stopped",
                                     "--save", f"{root}/stopped"])
    assert resumed.state.iteration == 6 and resumed.state.consumed_samples == 24
    # exact continuation: same samples, dropout RNG, optimizer moments and LR schedule
    assert resumed.losses == full.losses[3:], (resumed.losses, full.losses)
    assert fmt.read_tracker(f"{root}/stopped") == 6
    _dynamic_padding_resume(rank, base, data, root)
    # without dropout, for the data-parallel resize below
    nodrop = ["--lora-dropout", "0"]
    ref = _train(base, data, 6, nodrop + ["--save", f"{root}/nodrop", "--save-interval", "3",
                                          "--exit-interval", "3"])
    uninterrupted = _train(base, data, 6, nodrop)  # collective: every rank trains
    if rank == 0:
        with open(f"{root}/nodrop.json", "w") as f:
            json.dump(uninterrupted.losses, f)
    assert ref.state.iteration == 3


def _dynamic_padding_resume(rank, base, data, root):
    """DP2 + dropout + --no-pad-to-seq-lengths: the DP ranks' batches differ in length, so their
    RNG streams diverge; each rank must get its own state back (one shared state is not exact)."""
    from megatron.core import parallel_state

    from mindlora.checkpoint import megatron_format as fmt
    from mindlora.training.args import parse_args
    from mindlora.training.loop import Trainer

    dyn = ["--no-pad-to-seq-lengths"]
    full = _train(base, data, 6, dyn)
    _train(base, data, 6, dyn + ["--save", f"{root}/dyn", "--exit-interval", "3"])
    saved = fmt.load_rank_file(fmt.rank_file_path(f"{root}/dyn", 3, 0, 0, 1))["rng_state"]
    assert len(saved) == 2 and not torch.equal(saved[0]["cpu"], saved[1]["cpu"])
    dp_rank = parallel_state.get_data_parallel_rank()
    # what --no-load-optim / --no-load-rng change in what a resume restores
    for extra, optim_loaded, rng_loaded in (([], True, True), (["--no-load-optim"], False, True),
                                            (["--no-load-rng"], True, False)):
        trainer = Trainer(parse_args(_flags(base, data, 6, dyn + ["--lora-load", f"{root}/dyn",
                                                                  *extra])), log=lambda *_: None)
        assert trainer.state.iteration == 3, extra
        assert bool(trainer.optimizer.state_dict()["state"]) == optim_loaded, extra
        assert torch.equal(torch.get_rng_state(), saved[dp_rank]["cpu"]) == rng_loaded, extra
    resumed = _train(base, data, 6, dyn + ["--lora-load", f"{root}/dyn"])
    assert resumed.losses == full.losses[3:], (resumed.losses, full.losses)


def _resume_body(rank, world, base, data, root):
    """World 1 (DP1): resume the DP2 checkpoint (data-parallel size may change)."""
    from mindlora.checkpoint import megatron_format as fmt

    with open(f"{root}/nodrop.json") as f:
        full = json.load(f)
    resumed = _train(base, data, 6, ["--lora-load", f"{root}/nodrop", "--lora-dropout", "0"])
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full[3:]),
                               rtol=1e-5, atol=0)
    # the adapter learned something: B is no longer zero; files hold LoRA tensors only
    payload = fmt.load_rank_file(fmt.rank_file_path(f"{root}/full", 6, 0, 0, 1))
    b = [v for k, v in payload["model"].items() if k.endswith("lora_B.weight")]
    assert b and all(t.abs().sum() > 0 for t in b)
    assert all("lora_" in k for k in payload["model"])


def _layout_body(rank, world, base, data, root):
    """World 2: an exact resume under TP2 is refused; --finetune reshards the weights."""
    with pytest.raises(ValueError, match="--finetune"):
        _train(base, data, 8, ["--lora-load", f"{root}/full",
                               "--tensor-model-parallel-size", "2"])
    tp2 = _train(base, data, 1, ["--lora-load", f"{root}/full", "--finetune",
                                 "--tensor-model-parallel-size", "2", "--lora-dropout", "0"])
    if rank == 0:
        with open(f"{root}/tp2.json", "w") as f:
            json.dump(tp2.losses, f)


def _finetune_tp1_body(rank, world, base, data, root):
    tp1 = _train(base, data, 1, ["--lora-load", f"{root}/full", "--finetune",
                                 "--lora-dropout", "0"])
    with open(f"{root}/tp2.json") as f:
        tp2 = json.load(f)
    torch.testing.assert_close(torch.tensor(tp2), torch.tensor(tp1.losses), rtol=1e-5, atol=0)


def test_exact_resume_layout_change_and_base_untouched(tmp_path):
    root = str(tmp_path)
    base = write_base_checkpoint(f"{root}/base", tiny_model())
    data = write_instruction_data(f"{root}/data/sft", n=40)
    before = _digest(base)
    spawn(_save_runs_body, 2, base, data, root)
    spawn(_resume_body, 1, base, data, root)
    spawn(_layout_body, 2, base, data, root)
    spawn(_finetune_tp1_body, 1, base, data, root)
    assert _digest(base) == before, "training must never modify the base checkpoint"
    assert not [d for d in os.listdir(f"{root}/full") if d.endswith(".tmp")]
