"""Dynamic activation quantization (per token; fp8 also per 128-column group).

Rows holding NaN or Inf get a non-finite scale and zero codes, so the non-finite value reaches the
output through the scale (y = acc x s_x x s_w) instead of turning into an arbitrary integer code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .schemes import FP8_BLOCK, FP8_MAX, INT8_MAX, amax_scale


def quantize_tokens_int8(x: torch.Tensor):
    """``[M, K]`` -> (int8 codes ``[M, K]``, fp32 scales ``[M]``): s = max(amax, 1e-12)/127,
    q = clamp(round(x / s), -127, 127)."""
    xf = x.float()
    s = amax_scale(xf.abs().amax(dim=-1), INT8_MAX)
    q = torch.round(xf / s.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX)
    return torch.nan_to_num(q, nan=0.0).to(torch.int8), s


def quantize_tokens_fp8(x: torch.Tensor):
    """``[M, K]`` -> (float8_e4m3fn codes ``[M, KB*128]`` zero-padded, fp32 scales ``[M, KB]``),
    KB = ceil(K/128): s = max(amax of the token's 128 columns, 1e-12)/448."""
    M, K = x.shape
    KB = -(-K // FP8_BLOCK)
    xg = F.pad(x.float(), (0, KB * FP8_BLOCK - K)).reshape(M, KB, FP8_BLOCK)
    s = amax_scale(xg.abs().amax(dim=-1), FP8_MAX)
    q = torch.nan_to_num((xg / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX), nan=0.0)
    return q.to(torch.float8_e4m3fn).reshape(M, KB * FP8_BLOCK), s
