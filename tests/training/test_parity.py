"""Loss-curve parity: every parallel layout trains like one process over the same global batch.

10 iterations of LoRA SFT on Alpaca records run through the real preprocessor (chat template,
prompt tokens masked), float32, global batch 8: TP2, PP2, DP2, TP2+sequence parallel,
interleaved PP2 (2 virtual stages), uneven PP2, TP2xPP2, TP2xDP2, and TP2 (+SP) with
``--lora-fusion`` (CCLoRA) must give the per-iteration losses and
grad norms of TP1xPP1xDP1 to 1e-5 relative. Several layouts run one after another inside one
spawned group (process start-up dominates on 2 cores).
"""
import json

import pytest

from tests.distributed.harness import spawn
from tests.training.fixtures import preprocess_alpaca, tiny_model, write_base_checkpoint

ITERS = 10


def _flags(base, data, extra):
    return ["--load", base, "--data-path", data, "--micro-batch-size", "1",
            "--global-batch-size", "8", "--seq-length", "96", "--train-iters", str(ITERS),
            "--lr", "1e-2", "--lr-warmup-iters", "2", "--lora-r", "4", "--lora-alpha", "8",
            "--clip-grad", "1.0", "--weight-decay", "0.01", "--log-interval", "100",
            "--no-pad-to-seq-lengths", "--pad-to-multiple-of", "4", *extra]


def _run(base, data, extra):
    from mindlora.training.args import parse_args
    from mindlora.training.loop import train

    result = train(parse_args(_flags(base, data, extra)), log=lambda *_: None)
    return result.losses, result.grad_norms


def _reference_body(rank, world, base, data, out):
    losses, norms = _run(base, data, [])
    with open(out, "w") as f:
        json.dump({"losses": losses, "norms": norms}, f)


def _compare(name, losses, norms, ref):
    """The parity check: AssertionError starting with '<name> losses:' / '<name> grad norms:'."""
    import torch

    assert len(losses) == ITERS, name
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(ref["losses"], dtype=torch.float64),
                               rtol=1e-5, atol=0, msg=lambda m: f"{name} losses: {m}")
    torch.testing.assert_close(torch.tensor(norms, dtype=torch.float64),
                               torch.tensor(ref["norms"], dtype=torch.float64),
                               rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} grad norms: {m}")


def _layouts_body(rank, world, base, data, ref_path, layouts):
    with open(ref_path) as f:
        ref = json.load(f)
    for name, extra in layouts:
        losses, norms = _run(base, data, extra)
        _compare(name, losses, norms, ref)


def _changed_lr_body(rank, world, base, data, ref_path):
    """The run itself must succeed; only the comparison may raise, and with its own message."""
    with open(ref_path) as f:
        ref = json.load(f)
    losses, norms = _run(base, data, ["--lr", "2e-2"])
    assert losses[0] == pytest.approx(ref["losses"][0], rel=1e-6)  # same start, then diverges
    with pytest.raises(AssertionError, match=r"^lr changed losses: Tensor-likes are not close!"):
        _compare("lr changed", losses, norms, ref)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    data, vocab = preprocess_alpaca(str(root / "alpaca"), n=96)
    model = tiny_model(num_layers=4, num_attention_heads=4, num_query_groups=2,
                       vocab_size=((vocab + 63) // 64) * 64)
    base = write_base_checkpoint(str(root / "base"), model)
    ref = str(root / "ref.json")
    spawn(_reference_body, 1, base, data, ref)
    with open(ref) as f:
        losses = json.load(f)["losses"]
    assert losses[-1] < losses[0], "the reference run must learn something"
    return base, data, ref


def test_two_rank_layouts_match_single_process(setup):
    base, data, ref = setup
    layouts = [
        ("TP2", ["--tensor-model-parallel-size", "2"]),
        ("PP2", ["--pipeline-model-parallel-size", "2"]),
        ("DP2", []),
        ("TP2+SP", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        ("PP2 interleaved", ["--pipeline-model-parallel-size", "2",
                             "--num-layers-per-virtual-pipeline-stage", "1"]),
        ("PP2 uneven", ["--pipeline-model-parallel-size", "2", "--num-layer-list", "1,3"]),
        ("TP2 --lora-fusion", ["--tensor-model-parallel-size", "2", "--lora-fusion"]),
        ("TP2+SP --lora-fusion", ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                  "--lora-fusion"]),
    ]
    spawn(_layouts_body, 2, base, data, ref, layouts)


def test_four_rank_layouts_match_single_process(setup):
    base, data, ref = setup
    layouts = [
        ("TP2xPP2", ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
        ("TP2xDP2+SP", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    ]
    spawn(_layouts_body, 4, base, data, ref, layouts)


def test_parity_check_can_fail(setup):
    """A different learning rate must be caught by the same comparison."""
    base, data, ref = setup
    spawn(_changed_lr_body, 1, base, data, ref)
