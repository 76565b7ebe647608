"""Batch-invariant GEMMs and row sums for the deterministic mode (:mod:`mojo_opset.modes`).

A BLAS library picks its algorithm (tile shape, split-K, GEMV or GEMM) from the matrix sizes, so
the bits of one row of ``x @ w.T`` change with the number of rows computed alongside it; a torch
reduction picks its thread layout from the number of outputs.  Here every product runs on blocks
of exactly :data:`ROWS` rows (the last block zero-padded), each block a separate call at an aligned
offset: the library sees one shape whatever the batch, and a row's result depends on that row
alone.  Autograd through these functions keeps the property: the input gradient of a block is
again a fixed-shape product, and weight gradients add the blocks' contributions in block order.

Elementwise ops are batch-invariant on GPUs (a CUDA kernel applies one scalar function to every
element).  On the CPU, torch's vectorised kernels compute exp-based functions (SiLU, sigmoid and
their gradients) with a vector library and the scalar tail of each thread's range with libm, which
may round differently: there a row is invariant when its feature sizes are whole vector chunks
(multiples of 16 elements) and the op has under 32768 elements (one thread), which the tests use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ROWS", "linear", "matmul", "row_sum", "slot_sum", "last_dim_sum"]

ROWS = 64   # rows per GEMM call: one shape for every batch (a multiple of 8: aligned block offsets)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its rows zero-padded to a multiple of ROWS (contiguous)."""
    M = x.shape[0]
    pad = -M % ROWS
    if pad == 0:
        return x.contiguous()
    return torch.cat([x, x.new_zeros(pad, x.shape[1])])


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (``x [M, K] @ w[N, K].T``) with each row's bits independent of M."""
    M = x.shape[0]
    if M == 0:
        return F.linear(x, w)
    xb = _blocks(x)
    parts = [F.linear(xb[i:i + ROWS], w) for i in range(0, xb.shape[0], ROWS)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out[:M]


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ w [K, N]`` with each row's bits independent of M."""
    return linear(x, w.t())


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(-1)`` of a 2-D tensor with each row's bits independent of the row count (a GEMM with
    a ones vector: a torch reduction lays out its threads by the number of rows)."""
    return matmul(x, x.new_ones(x.shape[1], 1)).squeeze(1)


def last_dim_sum(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(-1)`` over a short last dimension (quantization groups), added in index order."""
    acc = t[..., 0]
    for g in range(1, t.shape[-1]):
        acc = acc + t[..., g]
    return acc


def slot_sum(w: torch.Tensor) -> torch.Tensor:
    """``w.sum(-1, keepdim=True)`` over a few slots, added one slot after another."""
    acc = w[:, :1]
    for j in range(1, w.shape[1]):
        acc = acc + w[:, j:j + 1]
    return acc
