"""Weight quantizers and dequantizers for one matrix stack ``[E, N, K]`` (SPEC §3.6).

All three are symmetric with float32 scales (dequantized = code x scale), an amax floor of 1e-12
(zero rows/groups/blocks give zero codes, never NaN), and ``torch.round`` (half to even) then clamp
for the integer codes; fp8 codes come from the float8_e4m3fn cast, which also rounds to nearest even.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .int4 import pack_int4, unpack_int4
from .schemes import FP8_BLOCK, FP8_MAX, INT4_MAX, INT8_MAX, amax_scale


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def quantize_int8(w: torch.Tensor):
    """``[E, N, K]`` -> (int8 codes ``[E, N, K]``, fp32 scales ``[E, N]`` = amax_row / 127)."""
    w = w.float()
    s = amax_scale(w.abs().amax(dim=-1), INT8_MAX)
    q = torch.round(w / s.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, s


def quantize_int4(w: torch.Tensor, group: int):
    """``[E, N, K]`` -> (packed uint8 ``[E, N, K/2]``, fp32 scales ``[E, N, K/group]`` = amax_group / 7)."""
    E, N, K = w.shape
    wg = w.float().reshape(E, N, K // group, group)
    s = amax_scale(wg.abs().amax(dim=-1), INT4_MAX)
    q = torch.round(wg / s.unsqueeze(-1)).clamp(-INT4_MAX, INT4_MAX).to(torch.int8).reshape(E, N, K)
    return pack_int4(q), s


def _pad_to_blocks(w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape[-2:]
    return F.pad(w, (0, _ceil(K, FP8_BLOCK) * FP8_BLOCK - K, 0, _ceil(N, FP8_BLOCK) * FP8_BLOCK - N))


def quantize_fp8_block(w: torch.Tensor):
    """``[E, N, K]`` -> (float8_e4m3fn codes ``[E, N, K]``, fp32 scales ``[E, ceil(N/128), ceil(K/128)]``
    = amax_block / 448); edge blocks cover only the rows/columns that exist."""
    E, N, K = w.shape
    wp = _pad_to_blocks(w.float())
    NB, KB = wp.shape[1] // FP8_BLOCK, wp.shape[2] // FP8_BLOCK
    blocks = wp.reshape(E, NB, FP8_BLOCK, KB, FP8_BLOCK)
    s = amax_scale(blocks.abs().amax(dim=(2, 4)), FP8_MAX)
    q = (blocks / s[:, :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(E, NB * FP8_BLOCK, KB * FP8_BLOCK)[:, :N, :K].contiguous(), s


def expand_block_scales(s: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Block scales ``[..., NB, KB]`` -> one scale per element ``[..., N, K]``."""
    return s.repeat_interleave(FP8_BLOCK, dim=-2)[..., :N, :].repeat_interleave(FP8_BLOCK, dim=-1)[..., :K]


def quantize_weight(fmt: str, w: torch.Tensor, group: int | None):
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "int4":
        return quantize_int4(w, group)
    return quantize_fp8_block(w)


def dequantize_weight(fmt: str, q: torch.Tensor, s: torch.Tensor, group: int | None) -> torch.Tensor:
    """Codes and scales of one or more matrices (``[..., N, K]`` logical) -> float32 ``[..., N, K]``."""
    if fmt == "int8":
        return q.float() * s.unsqueeze(-1)
    if fmt == "int4":
        codes = unpack_int4(q).float()
        return codes * s.repeat_interleave(group, dim=-1)
    N, K = q.shape[-2:]
    return q.float() * expand_block_scales(s, N, K)
