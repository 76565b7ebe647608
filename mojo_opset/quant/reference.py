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

from ..ops.combine import combine_reference
from ..ops.experts import swiglu
from ..ops.permute import permute_reference
from .activations import quantize_tokens_fp8, quantize_tokens_int8
from .int4 import unpack_int4
from .matmul import linear_fp8_block, linear_w4a8, linear_w8a8
from .weights import dequantize_weight


def quant_linear(x: torch.Tensor, fmt: str, act: str | None, q: torch.Tensor, s: torch.Tensor,
                 group: int | None) -> torch.Tensor:
    """``x [M, K] @ W.T`` for one quantized matrix ``W [N, K]`` (codes q, scales s); result in x's dtype."""
    if act is None:
        return F.linear(x, dequantize_weight(fmt, q, s, group).to(x.dtype))
    if act == "fp8":
        xq, sx = quantize_tokens_fp8(x)
        return linear_fp8_block(xq, sx, q, s).to(x.dtype)
    xq, sx = quantize_tokens_int8(x)
    if fmt == "int8":
        return linear_w8a8(xq, sx, q, s).to(x.dtype)
    return linear_w4a8(xq, sx, unpack_int4(q), s, group).to(x.dtype)


def quant_expert_mlp(xs: torch.Tensor, qexperts, e: int) -> torch.Tensor:
    """SwiGLU MLP of expert ``e`` on rows ``xs [M, H]``; returns ``[M, H]`` in xs's dtype."""
    info = qexperts.info
    q13, s13, q2, s2 = qexperts.expert_weights(e)
    g = qexperts.group_size
    h = quant_linear(xs, info.weight, info.activation, q13, s13, g)
    a = swiglu(h, xs.dtype)
    return quant_linear(a, info.weight, info.activation, q2, s2, g)


def quant_experts_reference(x, topk_ids, topk_weights, qexperts, activation="swiglu"):
    """``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` with quantized experts; ``[T, H]`` in x's dtype.

    topk_ids index qexperts' experts (a rank's local ids under expert parallelism)."""
    T, E = x.shape[0], qexperts.num_experts
    px, _counts, ends, _row_src, pair_row = permute_reference(x, topk_ids, E, align=1)
    y = torch.zeros_like(px)
    start = 0
    for e, end in enumerate(ends.tolist()):   # the reference reads group sizes on the host
        if end > start:
            y[start:end] = quant_expert_mlp(px[start:end], qexperts, e)
        start = end
    return combine_reference(y, pair_row, topk_weights, T)
