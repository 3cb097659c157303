"""CCLoRA (``--lora-fusion``): the frozen base linear and its LoRA branch in ONE autograd function.

``y = x W^T + s (xd A^T) B^T`` with ``xd = dropout(x)`` (``xd is x`` without dropout). The base
and the LoRA branch are independent, so the collectives LoRA needs can ride in the buffers of the
base layer's own collectives (each tensor flattened into one shared buffer, :func:`_pack`), and
what remains runs asynchronously beside a local matmul. ``layers.py`` stays the reference; the
tests in ``tests/lora/test_fused.py`` hold these functions to it. Per case (``T`` tokens,
collectives beyond megatron-core's plain layer in brackets; docs/lora.md has the table):

* TP=1 (:class:`_LocalLoRA`): no collective at all.
* column, no SP (:class:`_ColumnLoRA`) [+0; unfused +1]: backward all-reduces ``[g W_k | s g B_k]``
  in one buffer: the base input-gradient partial and LoRA's ``dz`` partial, overlapped with the
  local ``dB``.
* column, SP (:class:`_ColumnSPLoRA`) [+1; unfused +3]: forward all-gathers ``[x_k | xd_k A^T]``
  in one buffer (the base's gather of x carries LoRA's z); backward reduce-scatters
  ``[g W_k | s g B_k]`` in one buffer (overlapped with ``dB``), then all-reduces the ``[r, in]``
  partial ``dA`` (each rank saw T/tp tokens), overlapped with the LoRA input-gradient matmul.
* row, no SP / SP (:class:`_RowLoRA`, :class:`_RowSPLoRA`) [+0; unfused +1]: the LoRA partial
  product joins the base partial sum, and the partial ``z_k = xd_k A_k^T`` rides along in the same
  all-reduce / reduce-scatter, so every rank gets the summed ``z`` and B's gradient
  ``s g^T z`` needs no reduction (under SP the backward all-gather of ``g`` carries z's slices).

Each function takes the frozen weight (no weight gradient: the layer uses this path only when the
base is frozen), the float32 factors (cast to the activation dtype inside; their gradients are
returned in float32) and the process group from the layer. Bias is added by the callers, outside,
exactly where megatron-core adds it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def _tgrad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` summed over every token: ``[..., m]``, ``[..., n]`` -> ``[m, n]``."""
    return a.reshape(-1, a.shape[-1]).t() @ b.reshape(-1, b.shape[-1])


def _pack(tensors: Sequence[torch.Tensor], parts: int) -> torch.Tensor:
    """One contiguous ``[parts, n]`` buffer; row ``p`` holds the ``p``-th dim-0 (sequence) slice of
    every tensor, so one all-reduce, reduce-scatter or all-gather moves all of them together."""
    return torch.cat([t.reshape(parts, -1) for t in tensors], dim=1)


def _unpack(buf: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """Inverse of :func:`_pack` for a buffer of ``[rows, n]``: tensors of the given full shapes."""
    sizes = [math.prod(s) // buf.shape[0] for s in shapes]
    return [c.reshape(s) for c, s in zip(buf.split(sizes, dim=1), shapes)]


def _seq(shape: torch.Size, factor: float) -> tuple[int, ...]:
    """``shape`` with its sequence dim (0) scaled by ``factor`` (gathered or scattered)."""
    return (int(shape[0] * factor), *shape[1:])


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """``all_gather_single`` (torch >= 2.13's name for ``all_gather_into_tensor``)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    """``reduce_scatter_single`` (torch >= 2.13's name for ``reduce_scatter_tensor``)."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(out, inp, group=group, async_op=async_op)


def _casts(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    return a.to(x.dtype), b.to(x.dtype)


class _LocalLoRA(torch.autograd.Function):
    """TP=1: base and LoRA in one function, no collective."""

    @staticmethod
    def forward(ctx, x, xd, weight, a, b, s):
        a_, b_ = _casts(x, a, b)
        z = xd @ a_.t()
        ctx.save_for_backward(xd, z, weight, a_, b_)
        ctx.s = s
        return x @ weight.t() + s * (z @ b_.t())

    @staticmethod
    def backward(ctx, g):
        xd, z, weight, a_, b_ = ctx.saved_tensors
        dz = ctx.s * (g @ b_)
        return (g @ weight, dz @ a_, None, _tgrad(dz, xd).float(),
                ctx.s * _tgrad(g, z).float(), None)


class _ColumnLoRA(torch.autograd.Function):
    """Column base, no SP: x and z are replicated; ONE backward all-reduce of ``[g W_k | dz_k]``."""

    @staticmethod
    def forward(ctx, x, xd, weight, a, b, s, group):
        a_, b_ = _casts(x, a, b)
        z = xd @ a_.t()
        ctx.save_for_backward(xd, z, weight, a_, b_)
        ctx.s, ctx.group = s, group
        return x @ weight.t() + s * (z @ b_.t())

    @staticmethod
    def backward(ctx, g):
        xd, z, weight, a_, b_ = ctx.saved_tensors
        dx_part, dz_part = g @ weight, ctx.s * (g @ b_)
        buf = _pack([dx_part, dz_part], 1)
        work = dist.all_reduce(buf, group=ctx.group, async_op=True)
        db = ctx.s * _tgrad(g, z)  # B is split like W: its gradient is local; overlaps the reduce
        work.wait()
        dx, dz = _unpack(buf, [dx_part.shape, dz_part.shape])
        return dx, dz @ a_, None, _tgrad(dz, xd).float(), db.float(), None, None


class _ColumnSPLoRA(torch.autograd.Function):
    """Column base, SP: ONE forward all-gather of ``[x_k | z_k]``; backward ONE reduce-scatter of
    ``[g W_k | dz_k]`` and one ``[r, in]`` all-reduce of A's partial gradient."""

    @staticmethod
    def forward(ctx, x, xd, weight, a, b, s, group):
        a_, b_ = _casts(x, a, b)
        tp = dist.get_world_size(group)
        z = xd @ a_.t()
        gathered = x.new_empty(tp, x.numel() + z.numel())
        _all_gather(gathered, _pack([x, z], 1), group)
        full_x, full_z = _unpack(gathered, [_seq(x.shape, tp), _seq(z.shape, tp)])
        ctx.save_for_backward(xd, full_z, weight, a_, b_)
        ctx.s, ctx.group = s, group
        return full_x @ weight.t() + s * (full_z @ b_.t())

    @staticmethod
    def backward(ctx, g):
        xd, full_z, weight, a_, b_ = ctx.saved_tensors
        tp = dist.get_world_size(ctx.group)
        dx_part, dz_part = g @ weight, ctx.s * (g @ b_)
        buf = _pack([dx_part, dz_part], tp)
        mine = buf.new_empty(1, buf.shape[1])
        work = _reduce_scatter(mine, buf, ctx.group, async_op=True)
        db = ctx.s * _tgrad(g, full_z)  # local (B split like W); overlaps the reduce-scatter
        work.wait()
        dx, dz = _unpack(mine, [_seq(dx_part.shape, 1 / tp), _seq(dz_part.shape, 1 / tp)])
        da = _tgrad(dz, xd).float()  # this rank's T/tp tokens only: sum over TP
        work = dist.all_reduce(da, group=ctx.group, async_op=True)
        dxd = dz @ a_  # overlaps the all-reduce of dA
        work.wait()
        return dx, dxd, None, da, db.float(), None, None


class _RowLoRA(torch.autograd.Function):
    """Row base, no SP: ONE forward all-reduce of ``[x_k W_k^T + s z_k B^T | z_k]``; no backward
    collective (every rank holds the summed z, so B's gradient is complete)."""

    @staticmethod
    def forward(ctx, x, xd, weight, a, b, s, group):
        a_, b_ = _casts(x, a, b)
        z_part = xd @ a_.t()
        y_part = x @ weight.t() + s * (z_part @ b_.t())
        buf = _pack([y_part, z_part], 1)
        dist.all_reduce(buf, group=group)
        y, z = _unpack(buf, [y_part.shape, z_part.shape])
        ctx.save_for_backward(xd, z, weight, a_, b_)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, g):
        xd, z, weight, a_, b_ = ctx.saved_tensors
        dz = ctx.s * (g @ b_)
        return (g @ weight, dz @ a_, None, _tgrad(dz, xd).float(),
                ctx.s * _tgrad(g, z).float(), None, None)


class _RowSPLoRA(torch.autograd.Function):
    """Row base, SP: ONE forward reduce-scatter of ``[partial | z_k]``; ONE backward all-gather of
    ``[g_k | z slice_k]``, after which B's gradient is local."""

    @staticmethod
    def forward(ctx, x, xd, weight, a, b, s, group):
        a_, b_ = _casts(x, a, b)
        tp = dist.get_world_size(group)
        z_part = xd @ a_.t()
        y_part = x @ weight.t() + s * (z_part @ b_.t())
        buf = _pack([y_part, z_part], tp)
        mine = buf.new_empty(1, buf.shape[1])
        _reduce_scatter(mine, buf, group)
        y, z = _unpack(mine, [_seq(y_part.shape, 1 / tp), _seq(z_part.shape, 1 / tp)])
        ctx.save_for_backward(xd, z, weight, a_, b_)
        ctx.s, ctx.group = s, group
        return y

    @staticmethod
    def backward(ctx, g):
        xd, z, weight, a_, b_ = ctx.saved_tensors
        tp = dist.get_world_size(ctx.group)
        gathered = g.new_empty(tp, g.numel() + z.numel())
        _all_gather(gathered, _pack([g, z], 1), ctx.group)
        full_g, full_z = _unpack(gathered, [_seq(g.shape, tp), _seq(z.shape, tp)])
        dz = ctx.s * (full_g @ b_)
        return (full_g @ weight, dz @ a_, None, _tgrad(dz, xd).float(),
                ctx.s * _tgrad(full_g, full_z).float(), None, None)


def column_forward(layer, x: torch.Tensor, weight: Optional[torch.Tensor] = None):
    """Fused forward of a ``LoRAColumnParallelLinear``: ``(output shard, bias)`` as megatron-core
    returns them before any output gather. LoRA dropout is applied here, as the unfused layer does
    (same streams), and enters the function as the separate LoRA input ``xd``."""
    weight = layer.weight if weight is None else weight
    xd = layer._dropout(x, sharded_input=layer.sequence_parallel)
    args = (x, xd, weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    if dist.get_world_size(layer.tp_group) == 1:
        output = _LocalLoRA.apply(*args)
    elif layer.sequence_parallel:
        output = _ColumnSPLoRA.apply(*args, layer.tp_group)
    else:
        output = _ColumnLoRA.apply(*args, layer.tp_group)
    if layer.skip_bias_add:
        return output, layer.bias
    return (output + layer.bias if layer.bias is not None else output), None


def row_forward(layer, x: torch.Tensor):
    """Fused forward of a ``LoRARowParallelLinear``: ``(output, bias)`` as megatron-core's."""
    xd = layer._dropout(x, sharded_input=True)
    args = (x, xd, layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    if dist.get_world_size(layer.tp_group) == 1:
        output = _LocalLoRA.apply(*args)
    elif layer.sequence_parallel:
        output = _RowSPLoRA.apply(*args, layer.tp_group)
    else:
        output = _RowLoRA.apply(*args, layer.tp_group)
    if layer.skip_bias_add:
        return output, layer.bias
    return (output + layer.bias if layer.bias is not None else output), None
