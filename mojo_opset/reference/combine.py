"""Combine (unpermute): the weighted sum of each token's expert outputs, accumulated in fp32."""
from __future__ import annotations

import torch

from . import invariant
from .fused import fused


def combine_reference(expert_out, pair_row, topk_weights, num_tokens, deterministic=False):
    """``deterministic``: eager kernels only (a fused kernel may contract the multiply-add), and the
    weight gradients as fixed-shape products (:mod:`.invariant`)."""
    T, K = num_tokens, topk_weights.shape[1]
    pair_row = pair_row.long().view(T, K)
    if torch.compiler.is_compiling():   # plain autograd: Inductor fuses these steps in the graph itself
        return _weighted_sum.eager(expert_out, pair_row, topk_weights)
    return _Combine.apply(expert_out, pair_row, topk_weights, deterministic)


@fused
def _weighted_sum(y, pair_row, w):
    """out[t] = sum_j w[t, j] * y[pair_row[t, j]]: fp32, slot order, one [T, H] accumulator."""
    w = w.float()
    acc = y.index_select(0, pair_row[:, 0]).float() * w[:, 0:1]
    for j in range(1, pair_row.shape[1]):
        acc = acc + y.index_select(0, pair_row[:, j]).float() * w[:, j:j + 1]
    return acc.to(y.dtype)


@fused
def _weight_grads(grad_out, y, pair_row):
    """d w[t, j] = <grad_out[t], y[pair_row[t, j]]> in fp32."""
    g = grad_out.float()
    return torch.stack([(y.index_select(0, pair_row[:, j]).float() * g).sum(-1)
                        for j in range(pair_row.shape[1])], dim=1)


@fused
def _row_grads(grad_out, pair_row, w, rows: int):
    """d y[pair_row[t, j]] = w[t, j] * grad_out[t] in grad_out's dtype; rows no pair references
    (padding, only when there are more rows than pairs) get zeros."""
    dy = (grad_out.new_empty if rows == pair_row.numel() else grad_out.new_zeros)(rows, grad_out.shape[1])
    g = grad_out.float()
    for j in range(pair_row.shape[1]):
        dy.index_copy_(0, pair_row[:, j], (g * w[:, j:j + 1].float()).to(grad_out.dtype))
    return dy


class _Combine(torch.autograd.Function):
    """Saves the expert rows, the row map and the weights (no fp32 copies); gradients in the inputs'
    dtypes."""

    @staticmethod
    def forward(ctx, y, pair_row, w, deterministic=False):
        ctx.save_for_backward(y, pair_row, w)
        ctx.deterministic = deterministic
        return (_weighted_sum.eager if deterministic else _weighted_sum)(y, pair_row, w)

    @staticmethod
    def backward(ctx, grad_out):
        y, pair_row, w = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need = ctx.needs_input_grad
        det = ctx.deterministic
        dy = (_row_grads.eager if det else _row_grads)(grad_out, pair_row, w, y.shape[0]) if need[0] else None
        dw = None
        if need[2]:
            dw = (_invariant_weight_grads if det else _weight_grads)(grad_out, y, pair_row).to(w.dtype)
        return dy, None, dw, None


def _invariant_weight_grads(grad_out, y, pair_row):
    """:func:`_weight_grads` with each token's dot products independent of the other tokens."""
    g = grad_out.float()
    return torch.stack([invariant.row_sum(y.index_select(0, pair_row[:, j]).float() * g)
                        for j in range(pair_row.shape[1])], dim=1)
