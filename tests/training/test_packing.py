"""Packed SFT trains on exactly the objective of the same samples unpacked (neat packing).

Model level, at TP1, TP2 + sequence parallel and PP2: one micro-batch of two packed rows (three
samples each, from ``--pack`` data) and the same six samples unpacked, cut out of those rows
at their segment boundaries, three micro-batches of two: the loss summed over tokens and every
LoRA gradient (local shard, B factors made non-zero so A's gradients are too) must agree to 1e-5
relative in float32 (``tests/lora/checks.py`` explains the atol). The comparison can fail: the
packed rows without their segment ids (one running sequence, attention across samples) give
another loss, and so do packed rows whose positions are all 0 (RoPE follows position_ids).

End to end (TP1 and PP2): Alpaca records preprocessed twice, with and without ``--pack``; both
runs take the whole training set as their global batch (8 packed rows / 24 samples), so every
step sees the same samples and the per-iteration losses and grad norms must match to 1e-5. A
smaller global batch cannot be compared: the runs walk seeded permutations of different things
(8 rows, 24 samples; packing also regroups samples longest first), so a step of one run does not
hold the samples of the same step of the other.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from mindlora.data.dataset import InstructionDataset
from mindlora.models.attention import packed_attention_mask
from mindlora.parallel.layout import split_rule
from mindlora.training.batches import pad_to_common_length, segment_positions, to_model_batch
from tests.distributed.harness import spawn
from tests.lora.checks import RTOL, assert_matches
from tests.training.fixtures import preprocess_alpaca, tiny_model, write_base_checkpoint

SEQ, N_SAMPLES, E2E_ITERS = 256, 24, 3


def test_positions_restart_and_mask_is_block_diagonal():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 3, 3]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    allowed = ~packed_attention_mask(seg)[:, 0]
    assert allowed.shape == (2, 6, 6)
    assert allowed[0, 4].tolist() == [False, False, False, True, True, False]
    assert allowed[0, 2].tolist() == [True, True, True, False, False, False]
    assert torch.equal(allowed[1], torch.ones(6, 6, dtype=torch.bool).tril())
    padded = pad_to_common_length([to_model_batch({"input_ids": torch.ones(1, 3, dtype=torch.long),
                                                   "labels": torch.ones(1, 3, dtype=torch.long),
                                                   "segment_ids": torch.tensor([[1, 2, 2]])}),
                                   to_model_batch({"input_ids": torch.ones(1, 5, dtype=torch.long),
                                                   "labels": torch.ones(1, 5, dtype=torch.long)})])
    assert padded[0]["segment_ids"].tolist() == [[1, 2, 2, 0, 0]]
    assert padded[0]["position_ids"].tolist() == [[0, 0, 1, 0, 1]]
    assert padded[1]["position_ids"].tolist() == [[0, 1, 2, 3, 4]]


def _flags(base, data, gbs, extra=()):
    return ["--load", base, "--data-path", data, "--micro-batch-size", "2" if gbs == 2 else "1",
            "--global-batch-size", str(gbs), "--seq-length", str(SEQ), "--split", "100,0,0",
            "--train-iters", str(E2E_ITERS), "--lr", "1e-2", "--lr-warmup-iters", "1",
            "--lora-r", "4", "--lora-alpha", "8", "--clip-grad", "1.0", "--log-interval", "100",
            "--no-pad-to-seq-lengths", "--pad-to-multiple-of", "4", *extra]


def _split_rows(rows):
    """The samples of packed rows, cut at their segment boundaries (unpacked, as preprocessed)."""
    out = []
    for row in rows:
        seg = row["segment_ids"]
        for k in seg.unique().tolist():
            keep = seg == k
            out.append({"input_ids": row["input_ids"][keep], "labels": row["labels"][keep]})
    return out


def _nonzero_lora(trainer, tp_rank):
    """Seeded, non-zero LoRA factors; replicated factors get the same values on every TP rank."""
    with torch.no_grad():
        for name, p in trainer.params:
            sharded = split_rule(name).dim is not None
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + sharded * tp_rank)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _loss_and_grads(trainer, batches):
    for _, p in trainer.params:
        p.grad = None
    for c in trainer.chunks:
        c.train()
    if trainer.parallel.pipeline_model_parallel_size > 1:
        batches = pad_to_common_length(batches)
    loss_sum, tokens = trainer._run_schedule(batches, forward_only=False)
    # finalize_grads divided by the token count: multiply back to the summed-loss gradient.
    return loss_sum, tokens, {n: p.grad * tokens for n, p in trainer.params}


def _compare(what, packed, unpacked):
    (loss_p, tok_p, grads_p), (loss_u, tok_u, grads_u) = packed, unpacked
    assert tok_p == tok_u and tok_p > 0, f"{what}: labelled tokens {tok_p} != {tok_u}"
    assert abs(loss_p - loss_u) <= RTOL * abs(loss_u), f"{what}: loss sum {loss_p} != {loss_u}"
    assert grads_p.keys() == grads_u.keys() and grads_p
    for name in grads_u:
        assert_matches(grads_p[name], grads_u[name], f"{what}: {name} grad")


def _model_level(rank, name, base, unpacked, packed, extra, can_fail=False):
    from megatron.core import parallel_state

    from mindlora.training.args import parse_args
    from mindlora.training.loop import Trainer

    trainer = Trainer(parse_args(_flags(base, unpacked, 2, extra)), log=lambda *_: None)
    _nonzero_lora(trainer, parallel_state.get_tensor_model_parallel_rank())
    rows = [InstructionDataset(packed, SEQ)[i] for i in range(2)]
    samples = _split_rows(rows)
    assert len(samples) == 6, "each packed row should hold three samples"
    collate = trainer.data.collate
    packed_batch = [to_model_batch(collate(rows))]
    unpacked_batches = [to_model_batch(collate(samples[i:i + 2])) for i in range(0, 6, 2)]
    reference = _loss_and_grads(trainer, unpacked_batches)
    _compare(name, _loss_and_grads(trainer, packed_batch), reference)
    if can_fail:
        with pytest.raises(ValueError, match="either segment_ids or attention_mask"):
            trainer.chunks[0](packed_batch[0]["tokens"], packed_batch[0]["position_ids"],
                              packed_attention_mask(packed_batch[0]["segment_ids"]),
                              segment_ids=packed_batch[0]["segment_ids"])
        # Packing semantics off: the same rows as one running sequence each.
        plain = [{k: v for k, v in packed_batch[0].items() if k != "segment_ids"}]
        plain[0]["position_ids"] = torch.arange(plain[0]["tokens"].shape[1]).expand_as(
            plain[0]["tokens"])
        with pytest.raises(AssertionError, match=f"{name} off: loss sum"):
            _compare(f"{name} off", _loss_and_grads(trainer, plain), reference)
        # RoPE is relative, so once attention stays inside a sample a per-sample position shift
        # is invisible; positions the rotations cannot absorb (all 0) must show, or the model
        # would be ignoring position_ids as megatron-core's GPTModel does.
        flat = dict(packed_batch[0], position_ids=torch.zeros_like(packed_batch[0]["tokens"]))
        with pytest.raises(AssertionError, match=f"{name} positions 0: loss sum"):
            _compare(f"{name} positions 0", _loss_and_grads(trainer, [flat]), reference)


def _end_to_end(name, base, unpacked, packed, n_rows, extra=()):
    from mindlora.training.args import parse_args
    from mindlora.training.loop import train

    runs = {}
    for kind, data, gbs in (("unpacked", unpacked, N_SAMPLES), ("packed", packed, n_rows)):
        runs[kind] = train(parse_args(_flags(base, data, gbs, extra)), log=lambda *_: None)
    assert runs["unpacked"].losses[-1] < runs["unpacked"].losses[0], "the run must learn"
    for key in ("losses", "grad_norms"):
        torch.testing.assert_close(torch.tensor(getattr(runs["packed"], key), dtype=torch.float64),
                                   torch.tensor(getattr(runs["unpacked"], key),
                                                dtype=torch.float64),
                                   rtol=RTOL, atol=0, msg=lambda m: f"{name} end to end {key}: {m}")


def _single_body(rank, world, base, unpacked, packed, n_rows):
    _model_level(rank, "TP1", base, unpacked, packed, [], can_fail=True)
    _end_to_end("TP1", base, unpacked, packed, n_rows)


def _parallel_body(rank, world, base, unpacked, packed, n_rows):
    _model_level(rank, "TP2+SP", base, unpacked, packed,
                 ["--tensor-model-parallel-size", "2", "--sequence-parallel"])
    _model_level(rank, "PP2", base, unpacked, packed, ["--pipeline-model-parallel-size", "2"],
                 can_fail=True)
    _end_to_end("PP2", base, unpacked, packed, n_rows, ["--pipeline-model-parallel-size", "2"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    unpacked, vocab = preprocess_alpaca(str(root / "unpacked"), n=N_SAMPLES, seq_length=SEQ)
    packed, _ = preprocess_alpaca(str(root / "packed"), n=N_SAMPLES, seq_length=SEQ, pack=True)
    rows = InstructionDataset(packed, SEQ)
    assert sum(int(rows[i]["segment_ids"].max()) for i in range(len(rows))) == N_SAMPLES
    model = tiny_model(vocab_size=((vocab + 63) // 64) * 64, max_position_embeddings=SEQ)
    base = write_base_checkpoint(str(root / "base"), model)
    return base, unpacked, packed, len(rows)


def test_packed_equals_unpacked_single_process(setup):
    spawn(_single_body, 1, *setup)


def test_packed_equals_unpacked_tp2_sp_and_pp2(setup):
    spawn(_parallel_body, 2, *setup)
