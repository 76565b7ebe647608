"""Quantized GEMMs of the reference, with exact accumulation.

Integer codes are multiplied as float32 holding integers, in K-chunks short enough that every
partial sum stays below 2**24 (so each fp32 product and sum is exact, on any device and in any
summation order, TF32 included), then the chunks are summed in int64: the int32 accumulator of an
integer kernel, exactly.  fp8 block products are summed in float64, which is exact for 128 products
of two e4m3 values (their significands span fewer than 53 bits); devices without float64 use
float32 there.  Scaling then happens in float32 (int schemes) or float64 (fp8), rounded once to fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.invariant import last_dim_sum
from .schemes import FP8_BLOCK

_EXACT_F32 = 1 << 24
_BUDGET = 1 << 22           # elements of the [rows, N, groups] partial-sum tensor per row chunk


def _row_chunks(M: int, per_row: int):
    step = max(1, _BUDGET // max(1, per_row))
    return range(0, M, step), step


def int_group_sums(a: torch.Tensor, b: torch.Tensor, group: int, bound: int) -> torch.Tensor:
    """``out[m, n, g] = sum_{k in group g} a[m, k] * b[n, k]`` exactly, int64 ``[M, N, K/group]``.

    a ``[M, K]``, b ``[N, K]`` hold integers with ``|a * b| <= bound``."""
    M, K = a.shape
    N, G = b.shape[0], K // group
    c = min(group, (_EXACT_F32 - 1) // bound)        # chunk length whose fp32 dot is exact
    S = -(-group // c)
    pad = S * c - group
    bf = F.pad(b.float().reshape(N, G, group), (0, pad)).reshape(N, G * S, c).transpose(0, 1)
    out = torch.empty(M, N, G, dtype=torch.int64, device=a.device)
    starts, step = _row_chunks(M, N * G * S)
    for m0 in starts:
        af = F.pad(a[m0:m0 + step].float().reshape(-1, G, group), (0, pad)).reshape(-1, G * S, c)
        part = torch.bmm(af.transpose(0, 1), bf.transpose(1, 2))   # [G*S, m, N], exact integers
        out[m0:m0 + step] = part.to(torch.int64).reshape(G, S, -1, N).sum(1).permute(1, 2, 0)
    return out


def linear_w8a8(xq, sx, wq, sw):
    """int8 x int8 per token / per channel: ``y = acc * s_x * s_w``, fp32 ``[M, N]``."""
    acc = int_group_sums(xq, wq, xq.shape[1], 127 * 128)[..., 0]
    return acc.float() * sx.unsqueeze(-1) * sw


def _group_sum(t: torch.Tensor, deterministic: bool) -> torch.Tensor:
    # a torch reduction's order follows the number of rows: the deterministic mode adds in group order
    return last_dim_sum(t) if deterministic else t.sum(-1)


def linear_w4a8(xq, sx, wq, sw, group, deterministic=False):
    """int8 tokens x int4 groups: ``y = s_x * sum_g s_w[n, g] * acc_g``, fp32 ``[M, N]``.

    wq: unpacked int4 codes ``[N, K]``; sw ``[N, K/group]``."""
    acc = int_group_sums(xq, wq, group, 127 * 8)
    return _group_sum(acc.float() * sw, deterministic) * sx.unsqueeze(-1)


def _fp8_acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def linear_fp8_block(xq, sx, wq, sw, deterministic=False):
    """fp8 tokens (per 128 columns) x fp8 128x128 blocks, fp32 ``[M, N]``:
    ``y[m, n] = sum_kb s_x[m, kb] * s_w[n // 128, kb] * sum_{k in kb} q_x[m, k] q_w[n, k]``.

    xq ``[M, KB*128]`` (zero-padded), sx ``[M, KB]``; wq ``[N, K]``; sw ``[ceil(N/128), KB]``."""
    M, Kp = xq.shape
    N, K = wq.shape
    KB = Kp // FP8_BLOCK
    dt = _fp8_acc_dtype(xq.device)
    wf = F.pad(wq.to(dt), (0, Kp - K)).reshape(N, KB, FP8_BLOCK).transpose(0, 1)       # [KB, N, 128]
    sw_rows = sw.to(dt).repeat_interleave(FP8_BLOCK, dim=0)[:N]                          # [N, KB]
    y = torch.empty(M, N, dtype=torch.float32, device=xq.device)
    starts, step = _row_chunks(M, N * KB)
    for m0 in starts:
        xf = xq[m0:m0 + step].to(dt).reshape(-1, KB, FP8_BLOCK).transpose(0, 1)       # [KB, m, 128]
        acc = torch.bmm(xf, wf.transpose(1, 2)).permute(1, 2, 0)                       # [m, N, KB]
        y[m0:m0 + step] = _group_sum(acc * sx[m0:m0 + step].to(dt).unsqueeze(1) * sw_rows, deterministic).float()
    return y
