"""The fused vocab-parallel cross-entropy equals plain cross-entropy over full logits."""
import torch

from mindlora.models.cross_entropy import fused_linear_cross_entropy


def reference_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain per-token cross-entropy over full logits (the yardstick)."""
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none",
                                             ignore_index=-100)
from mindlora.parallel.layout import pad_vocab
from tests.distributed.harness import spawn


def _case(seed=0, n=37, h=16, vocab=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float()
    weight = torch.randn(vocab, h, generator=g) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.rand(n, generator=g)
    return hidden, weight, labels, upstream


def _reference(hidden, weight, labels, upstream):
    h = hidden.clone().requires_grad_(True)
    loss = reference_cross_entropy(h @ weight.t(), labels)
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad


def test_single_rank_matches_reference_across_chunking(monkeypatch):
    import mindlora.models.cross_entropy as ce

    hidden, weight, labels, upstream = _case()
    want_loss, want_grad = _reference(hidden, weight, labels, upstream)
    for chunk_elems in (7 * 50, 1 << 22):  # several chunks, and one chunk
        monkeypatch.setattr(ce, "_CHUNK_ELEMENTS", chunk_elems)
        h = hidden.clone().requires_grad_(True)
        loss = fused_linear_cross_entropy(h, weight, labels)
        (loss * upstream).sum().backward()
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h.grad, want_grad, rtol=1e-5, atol=1e-6)
    # the comparison can fail: a wrong label changes the loss
    bad = fused_linear_cross_entropy(hidden, weight, (labels + 1) % 50)
    assert not torch.allclose(bad, want_loss, rtol=1e-3)


def _tp_body(rank, world):
    import torch.distributed as dist
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    hidden, weight, labels, upstream = _case(vocab=50)
    want_loss, want_grad = _reference(hidden, weight, labels, upstream)
    padded = pad_vocab(50, world)  # 50 -> 52 at TP=4: the last rank holds 2 padding rows
    full = torch.zeros(padded, weight.shape[1])
    full[:50] = weight
    v_local = padded // world
    local_w = full[rank * v_local:(rank + 1) * v_local]
    group = dist.group.WORLD
    h = hidden.clone().requires_grad_(True)
    loss = fused_linear_cross_entropy(copy_to_tensor_model_parallel_region(h, group=group),
                                      local_w, labels, vocab_start=rank * v_local,
                                      vocab_valid=50 - rank * v_local, tp_group=group)
    (loss * upstream).sum().backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, want_grad, rtol=1e-5, atol=1e-6)


def test_vocab_parallel_with_padding_matches_reference():
    spawn(_tp_body, 4)
