"""CCLoRA (``--lora-fusion``): the frozen base linear and its LoRA branch in ONE autograd function.

``y = x W^T + s (xd A^T) B^T`` with ``xd = dropout(x)`` (``xd is x`` without dropout). The base
and the LoRA branch are independent, so the collectives LoRA needs ride in the buffers of the base
layer's own collectives (the tensors flattened side by side into one buffer, :func:`_pack`), and
what remains runs asynchronously beside a local matmul. ``layers.py`` stays the reference;
``tests/lora/test_fused.py`` holds these functions to it. Per case (collectives beyond
megatron-core's plain layer in brackets, unfused LoRA's for comparison; docs/lora.md has the table):

* TP=1 (:class:`_LocalLoRA`) [0; 0]: one function, no collective.
* column, no SP (:class:`_ColumnLoRA`) [+0; +1]: the backward all-reduce carries
  ``[g W_k | s g B_k]``, the base input-gradient partial and LoRA's ``dz`` partial, while the
  local ``dB`` is computed.
* column, SP (:class:`_ColumnSPLoRA`) [+1; +3]: the forward all-gather carries ``[x_k | xd_k A^T]``;
  the backward reduce-scatter carries ``[g W_k | s g B_k]`` (beside ``dB``), then A's ``[r, in]``
  partial gradient (each rank saw T/tp tokens) is all-reduced beside the ``dz A`` matmul.
* row, no SP / SP (:class:`_RowLoRA` / :class:`_RowSPLoRA`) [+0; +1]: the LoRA partial product
  joins the base partial sum, and the partial ``z_k = xd_k A_k^T`` rides in the same all-reduce /
  reduce-scatter. Every rank then holds the summed ``z`` (under SP, its slice, which the backward
  all-gather of ``g`` carries back), so B's gradient ``s g^T z`` needs no reduction.

Each function takes the frozen base weight (it returns no weight gradient: the layer takes this
path only when the base is frozen), the float32 factors (cast to the activation dtype inside,
their gradients returned in float32) and the layer's process group. Callers add the bias outside,
where megatron-core adds it. The LoRA term is accumulated in place (``addmm_``), which on 2 CPU
cores was as fast as multiplying by a merged ``W + s B A`` at TP=1 (docs/lora.md) without that
weight-sized copy, so the merged form is not used.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def _2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _2d_view(t: torch.Tensor) -> torch.Tensor:
    """A 2-D *view* (never a copy) of a contiguous tensor, to accumulate into in place."""
    return t.view(-1, t.shape[-1])


def _tgrad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` summed over every token: ``[..., m]``, ``[..., n]`` -> ``[m, n]``.

    The rank-sized operand goes on the left: with ``b`` r wide, ``(b^T a)^T`` reads ``a``
    row-major and ran 5x faster on CPU than ``a^T b`` for ``a = [1024, 3072]``, ``r = 8``.
    """
    a2, b2 = _2d(a), _2d(b)
    if b2.shape[1] < a2.shape[1]:
        return (b2.t() @ a2).t().contiguous()  # contiguous: collectives may reduce it
    return a2.t() @ b2


class _FromRank(torch.autograd.Function):
    """``z @ w^T`` for a rank-sized ``z`` (``[..., r]``): autograd's own weight gradient,
    ``g^T z``, runs in the slow orientation (see :func:`_tgrad`); this one does not."""

    @staticmethod
    def forward(ctx, z, w):
        ctx.save_for_backward(z, w)
        return z @ w.t()

    @staticmethod
    def backward(ctx, g):
        z, w = ctx.saved_tensors
        dz = g @ w if ctx.needs_input_grad[0] else None
        dw = _tgrad(g, z).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dz, dw


def from_rank(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(z, w)`` for LoRA's B product, with a fast weight gradient."""
    return _FromRank.apply(z, w)


def _linear_lora(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, b: torch.Tensor,
                 s: float) -> torch.Tensor:
    """``x W^T + s z B^T``, the LoRA term accumulated in place (no ``[T, out]`` temporary)."""
    y = x @ weight.t()
    _2d_view(y).addmm_(_2d(z), b.t(), alpha=s)
    return y


def _input_grads(dx: torch.Tensor, dz: torch.Tensor, a: torch.Tensor, shared: bool):
    """Gradients for ``(x, xd)``: ``dx + dz A`` in place when the LoRA input is ``x`` itself."""
    if shared:
        _2d_view(dx).addmm_(_2d(dz), a)
        return dx, None
    return dx, dz @ a


def _pack(tensors: Sequence[torch.Tensor], parts: int) -> torch.Tensor:
    """One contiguous ``[parts, n]`` buffer; row ``p`` holds the ``p``-th dim-0 (sequence) slice of
    every tensor, so one all-reduce, reduce-scatter or all-gather moves all of them together."""
    return torch.cat([t.reshape(parts, -1) for t in tensors], dim=1)


def _unpack(buf: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """Inverse of :func:`_pack` for a ``[rows, n]`` buffer: tensors of the given full shapes."""
    sizes = [math.prod(s) // buf.shape[0] for s in shapes]
    return [c.reshape(s) for c, s in zip(buf.split(sizes, dim=1), shapes)]


def _seq(shape: torch.Size, factor: float) -> tuple[int, ...]:
    """``shape`` with its sequence dim (0) scaled by ``factor`` (gathered or scattered)."""
    return (int(shape[0] * factor), *shape[1:])


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """``all_gather_single`` (torch 2.13's name for ``all_gather_into_tensor``)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    """``reduce_scatter_single`` (torch 2.13's name for ``reduce_scatter_tensor``)."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(out, inp, group=group, async_op=async_op)


def _setup(ctx, x, xd, a, b, s, group=None):
    """Record the constants on ``ctx``; return the factors cast to the activation dtype."""
    ctx.s, ctx.group, ctx.shared = s, group, xd is x
    return a.to(x.dtype), b.to(x.dtype)


def _forward_full_input(ctx, x, xd, weight, a, b, s, group=None):
    """Forward where every rank holds the whole input (TP=1, or a column base without SP):
    ``x W^T + s z B^T`` with ``z = xd A^T`` computed locally; saves what backward needs."""
    a_, b_ = _setup(ctx, x, xd, a, b, s, group)
    z = xd @ a_.t()
    ctx.save_for_backward(xd, z, weight, a_, b_)
    return _linear_lora(x, weight, z, b_, s)


class _LocalLoRA(torch.autograd.Function):
    """TP=1: base and LoRA in one function, no collective."""

    @staticmethod
    def forward(ctx, x, xd, weight, a, b, s):
        return _forward_full_input(ctx, x, xd, weight, a, b, s)

    @staticmethod
    def backward(ctx, g):
        xd, z, weight, a_, b_ = ctx.saved_tensors
        dz = ctx.s * (g @ b_)
        dx, dxd = _input_grads(g @ weight, dz, a_, ctx.shared)
        return dx, dxd, None, _tgrad(dz, xd).float(), ctx.s * _tgrad(g, z).float(), None


class _ColumnLoRA(torch.autograd.Function):
    """Column base, no SP: x and z replicated; ONE backward all-reduce of ``[g W_k | dz_k]``."""

    @staticmethod
    def forward(ctx, x, xd, weight, a, b, s, group):
        return _forward_full_input(ctx, x, xd, weight, a, b, s, group)

    @staticmethod
    def backward(ctx, g):
        xd, z, weight, a_, b_ = ctx.saved_tensors
        dx_part, dz_part = g @ weight, ctx.s * (g @ b_)
        buf = _pack([dx_part, dz_part], 1)
        work = dist.all_reduce(buf, group=ctx.group, async_op=True)
        db = ctx.s * _tgrad(g, z)  # B is split like W's rows: dB is local; overlaps the reduce
        work.wait()
        dx, dz = _unpack(buf, [dx_part.shape, dz_part.shape])
        dx, dxd = _input_grads(dx, dz, a_, ctx.shared)
        return dx, dxd, None, _tgrad(dz, xd).float(), db.float(), None, None


class _ColumnSPLoRA(torch.autograd.Function):
    """Column base, SP: ONE forward all-gather of ``[x_k | z_k]``; backward ONE reduce-scatter of
    ``[g W_k | dz_k]`` and an ``[r, in]`` all-reduce of A's partial gradient."""

    @staticmethod
    def forward(ctx, x, xd, weight, a, b, s, group):
        a_, b_ = _setup(ctx, x, xd, a, b, s, group)
        tp = dist.get_world_size(group)
        z = xd @ a_.t()
        gathered = x.new_empty(tp, x.numel() + z.numel())
        _all_gather(gathered, _pack([x, z], 1), group)
        full_x, full_z = _unpack(gathered, [_seq(x.shape, tp), _seq(z.shape, tp)])
        ctx.save_for_backward(xd, full_z, weight, a_, b_)
        return _linear_lora(full_x, weight, full_z, b_, s)

    @staticmethod
    def backward(ctx, g):
        xd, full_z, weight, a_, b_ = ctx.saved_tensors
        tp = dist.get_world_size(ctx.group)
        dx_part, dz_part = g @ weight, ctx.s * (g @ b_)
        buf = _pack([dx_part, dz_part], tp)
        mine = buf.new_empty(1, buf.shape[1])
        work = _reduce_scatter(mine, buf, ctx.group, async_op=True)
        db = ctx.s * _tgrad(g, full_z)  # local (B split like W's rows); overlaps the scatter
        work.wait()
        dx, dz = _unpack(mine, [_seq(dx_part.shape, 1 / tp), _seq(dz_part.shape, 1 / tp)])
        da = _tgrad(dz, xd).float()  # from this rank's T/tp tokens only: sum it over TP
        work = dist.all_reduce(da, group=ctx.group, async_op=True)
        dx, dxd = _input_grads(dx, dz, a_, ctx.shared)  # overlaps the all-reduce of dA
        work.wait()
        return dx, dxd, None, da, db.float(), None, None


class _RowLoRA(torch.autograd.Function):
    """Row base, no SP: ONE forward all-reduce of ``[x_k W_k^T + s z_k B^T | z_k]``; no backward
    collective (every rank holds the summed z, so B's gradient is complete)."""

    @staticmethod
    def forward(ctx, x, xd, weight, a, b, s, group):
        a_, b_ = _setup(ctx, x, xd, a, b, s, group)
        z_part = xd @ a_.t()
        y_part = _linear_lora(x, weight, z_part, b_, s)
        buf = _pack([y_part, z_part], 1)
        dist.all_reduce(buf, group=group)
        y, z = _unpack(buf, [y_part.shape, z_part.shape])
        ctx.save_for_backward(xd, z, weight, a_, b_)
        return y

    @staticmethod
    def backward(ctx, g):
        xd, z, weight, a_, b_ = ctx.saved_tensors
        dz = ctx.s * (g @ b_)
        dx, dxd = _input_grads(g @ weight, dz, a_, ctx.shared)
        return dx, dxd, None, _tgrad(dz, xd).float(), ctx.s * _tgrad(g, z).float(), None, None


class _RowSPLoRA(torch.autograd.Function):
    """Row base, SP: ONE forward reduce-scatter of ``[partial | z_k]``; ONE backward all-gather
    of ``[g_k | z slice_k]``, after which B's gradient is local."""

    @staticmethod
    def forward(ctx, x, xd, weight, a, b, s, group):
        a_, b_ = _setup(ctx, x, xd, a, b, s, group)
        tp = dist.get_world_size(group)
        z_part = xd @ a_.t()
        y_part = _linear_lora(x, weight, z_part, b_, s)
        buf = _pack([y_part, z_part], tp)
        mine = buf.new_empty(1, buf.shape[1])
        _reduce_scatter(mine, buf, group)
        y, z = _unpack(mine, [_seq(y_part.shape, 1 / tp), _seq(z_part.shape, 1 / tp)])
        ctx.save_for_backward(xd, z, weight, a_, b_)
        return y

    @staticmethod
    def backward(ctx, g):
        xd, z, weight, a_, b_ = ctx.saved_tensors
        tp = dist.get_world_size(ctx.group)
        gathered = g.new_empty(tp, g.numel() + z.numel())
        _all_gather(gathered, _pack([g, z], 1), ctx.group)
        full_g, full_z = _unpack(gathered, [_seq(g.shape, tp), _seq(z.shape, tp)])
        dz = ctx.s * (full_g @ b_)
        dx, dxd = _input_grads(full_g @ weight, dz, a_, ctx.shared)
        return (dx, dxd, None, _tgrad(dz, xd).float(), ctx.s * _tgrad(full_g, full_z).float(),
                None, None)


def _with_bias(layer, output: torch.Tensor):
    """megatron-core's ``(output, bias)`` contract: bias returned when ``skip_bias_add``."""
    if layer.skip_bias_add:
        return output, layer.bias
    return (output + layer.bias if layer.bias is not None else output), None


def column_forward(layer, x: torch.Tensor, weight: Optional[torch.Tensor] = None):
    """Fused forward of a ``LoRAColumnParallelLinear``: ``(output shard, bias)`` as megatron-core
    returns them before any output gather. LoRA dropout is drawn here exactly as the unfused layer
    draws it (same streams, same input) and enters the function as the separate LoRA input ``xd``.

    Args:
        layer: the LoRA column layer (its weights, scaling, dropout and ``tp_group`` are used).
        x: ``[s, b, in]`` input (``[s/tp, b, in]`` under sequence parallel).
        weight: a base weight to use instead of ``layer.weight`` (megatron-core's argument).
    """
    weight = layer.weight if weight is None else weight
    xd = layer._dropout(x, sharded_input=layer.sequence_parallel)
    args = (x, xd, weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    if dist.get_world_size(layer.tp_group) == 1:
        return _with_bias(layer, _LocalLoRA.apply(*args))
    fn = _ColumnSPLoRA if layer.sequence_parallel else _ColumnLoRA
    return _with_bias(layer, fn.apply(*args, layer.tp_group))


def row_forward(layer, x: torch.Tensor):
    """Fused forward of a ``LoRARowParallelLinear``: ``(output, bias)`` as megatron-core's.

    Args:
        layer: the LoRA row layer (its weights, scaling, dropout and ``tp_group`` are used).
        x: ``[s, b, in/tp]`` input, already split on the hidden dim (``input_is_parallel``).
    """
    xd = layer._dropout(x, sharded_input=True)
    args = (x, xd, layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    if dist.get_world_size(layer.tp_group) == 1:
        return _with_bias(layer, _LocalLoRA.apply(*args))
    fn = _RowSPLoRA if layer.sequence_parallel else _RowLoRA
    return _with_bias(layer, fn.apply(*args, layer.tp_group))
