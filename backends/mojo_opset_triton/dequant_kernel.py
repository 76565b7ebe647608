"""Weight-only codes dequantized to the activations' dtype, as the reference's a16 GEMMs read them.

At many rows per expert the a16 GEMMs are compute-bound, and converting codes in front of every
tensor-core instruction (``quant_kernel.py``) costs more than writing the dequantized weights once
and running the float kernels on them (``quant_launch.py`` decides).  Each element is
``code x scale`` in fp32, rounded once to the output dtype: the reference's ``_dequantize`` bit for
bit.  int8 codes ``[n, N, K]`` with a scale per row ``[n, N]``; int4 codes packed two per byte along
K (low nibble = even column, values 8..15 are -8..-1) ``[n, N, K/2]`` with a scale per group of G
columns ``[n, N, K/G]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32
BLOCK_K = 256


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, out_ptr, N, K, stride_qe, stride_qn, stride_se, stride_sn, stride_sk,
                    G: tl.constexpr, INT4: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    e = tl.program_id(2).to(tl.int64)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    k = k0 + tl.arange(0, BK)
    nmask = n < N
    row = q_ptr + e * stride_qe + n.to(tl.int64)[:, None] * stride_qn
    s_row = s_ptr + e * stride_se + n.to(tl.int64) * stride_sn
    if INT4:
        kb = k0 // 2 + tl.arange(0, BK // 2)                 # a byte per column pair
        byte = tl.load(row + kb[None, :], mask=nmask[:, None] & (kb < K // 2)[None, :], other=0).to(tl.int32)
        lo = byte & 0xF
        hi = byte >> 4
        code = tl.reshape(tl.join(tl.where(lo >= 8, lo - 16, lo), tl.where(hi >= 8, hi - 16, hi)), [BN, BK])
        if G >= BK:                                          # the step inside one group
            s = tl.load(s_row + (k0 // G) * stride_sk, mask=nmask, other=0.0)[:, None]
        else:                                                # BK // G groups, each scale over G columns
            gs = k0 // G + tl.arange(0, BK // G)
            s = tl.load(s_row[:, None] + gs[None, :] * stride_sk, mask=nmask[:, None] & (gs * G < K)[None, :],
                        other=0.0)
            s = tl.reshape(tl.broadcast_to(s[:, :, None], [BN, BK // G, G]), [BN, BK])
    else:
        code = tl.load(row + k[None, :], mask=nmask[:, None] & (k < K)[None, :], other=0)
        s = tl.load(s_row, mask=nmask, other=0.0)[:, None]
    out = out_ptr + (e * N + n.to(tl.int64)[:, None]) * K + k[None, :]
    tl.store(out, (code.to(tl.float32) * s).to(out_ptr.dtype.element_ty), mask=nmask[:, None] & (k < K)[None, :])


def dequantize_experts(q: torch.Tensor, s: torch.Tensor, fmt: str, group: int | None, out: torch.Tensor):
    """``out`` (contiguous ``[n, N, K]``, the activations' dtype) := codes ``q`` times scales ``s`` of
    ``n`` experts; ``fmt`` ``"int8"`` or ``"int4"`` (``group``: the int4 group size)."""
    n, N, K = out.shape
    if out.numel() == 0:
        return out
    int4 = fmt == "int4"
    s3 = s if int4 else s.unsqueeze(-1)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K), n)
    _dequant_kernel[grid](q, s, out, N, K, q.stride(0), q.stride(1), s3.stride(0), s3.stride(1), s3.stride(2),
                          G=group if int4 else 1, INT4=int4, BN=BLOCK_N, BK=BLOCK_K, num_warps=4)
    return out
