"""The torch reference of the ``quant_moe_forward`` op: routed tokens through quantized experts.

Pairs are sorted by expert (the core permute), each expert runs on its rows, and the combine sums
the weighted pair outputs in fp32 (the core combine).  Per expert, with dt = x's dtype:

* a8 schemes: quantize the rows per token, exact integer (fp8: exact float64) GEMM, dequantize to
  fp32 and round to dt; SwiGLU in fp32, rounded to dt; re-quantize per token; second GEMM likewise.
* a16 schemes: dequantize the expert's weights (code x scale in fp32), cast to dt, and run the same
  ops as the bf16/fp32 reference (``F.linear`` in dt, SwiGLU in fp32 rounded to dt).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import invariant
from ..reference.combine import combine_reference
from ..reference.permute import permute_reference
from ..reference.swiglu import swiglu
from .activations import quantize_tokens_fp8, quantize_tokens_int8
from .int4 import unpack_int4
from .matmul import linear_fp8_block, linear_w4a8, linear_w8a8
from .weights import dequantize_weight


def quant_linear(x: torch.Tensor, fmt: str, act: str | None, q: torch.Tensor, s: torch.Tensor,
                 group: int | None, deterministic: bool = False) -> torch.Tensor:
    """``x [M, K] @ W.T`` for one quantized matrix ``W [N, K]`` (codes q, scales s); result in x's dtype.
    ``deterministic``: each row's bits independent of the other rows (the integer products are exact
    in any order; the float sums over groups and the a16 GEMM are made so)."""
    if act is None:
        linear = invariant.linear if deterministic else F.linear
        return linear(x, dequantize_weight(fmt, q, s, group).to(x.dtype))
    if act == "fp8":
        xq, sx = quantize_tokens_fp8(x)
        return linear_fp8_block(xq, sx, q, s, deterministic).to(x.dtype)
    xq, sx = quantize_tokens_int8(x)
    if fmt == "int8":
        return linear_w8a8(xq, sx, q, s).to(x.dtype)
    return linear_w4a8(xq, sx, unpack_int4(q), s, group, deterministic).to(x.dtype)


def quant_expert_mlp(xs: torch.Tensor, qexperts, e: int, deterministic: bool = False) -> torch.Tensor:
    """SwiGLU MLP of expert ``e`` on rows ``xs [M, H]``; returns ``[M, H]`` in xs's dtype.

    With activation smoothing, each projection's input is first multiplied by the expert's
    multipliers: in fp32 for the a8 schemes (their activation quantizer reads fp32), rounded to xs's
    dtype for the a16 schemes (their GEMM runs in that dtype)."""
    info = qexperts.info
    q13, s13, q2, s2 = qexperts.expert_weights(e)
    m13, m2 = qexperts.expert_smoothing(e)
    g, dt = qexperts.group_size, xs.dtype

    def project(v, q, s, m):
        if m is not None:
            v = v.float() * m
            if info.activation is None:
                v = v.to(dt)
        return quant_linear(v, info.weight, info.activation, q, s, g, deterministic).to(dt)

    a = swiglu(project(xs, q13, s13, m13), dt)
    return project(a, q2, s2, m2)


def quant_experts_rows(permuted_x, group_ends, qexperts, activation="swiglu", deterministic=False):
    """The ``moe_quant_experts`` reference: expert-sorted rows through their quantized experts;
    ``[R, H]`` in permuted_x's dtype, rows past ``group_ends[-1]`` zero; ``deterministic``: batch-invariant."""
    y = torch.zeros_like(permuted_x)
    if y.device.type == "meta":             # shapes only (no values to loop over)
        return y
    start = 0
    for e, end in enumerate(group_ends.tolist()):   # the reference reads group sizes on the host
        if end > start:
            y[start:end] = quant_expert_mlp(permuted_x[start:end], qexperts, e, deterministic)
        start = end
    return y


def quant_experts_reference(x, topk_ids, topk_weights, qexperts, activation="swiglu"):
    """``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` with quantized experts; ``[T, H]`` in x's dtype.

    topk_ids index qexperts' experts (a rank's local ids under expert parallelism)."""
    T, E = x.shape[0], qexperts.num_experts
    px, _counts, ends, _row_src, pair_row = permute_reference(x, topk_ids, E, align=1)
    return combine_reference(quant_experts_rows(px, ends, qexperts, activation), pair_row, topk_weights, T)
