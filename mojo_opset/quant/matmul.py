"""Quantized GEMMs of the reference, with exact accumulation, on a batch of matrices.

Every function takes operands with optional leading batch dimensions (``[..., M, K]`` rows against
``[..., N, K]`` weights, one weight matrix per batch entry: the reference batches tiles of rows with
their experts' weights).  Integer codes are multiplied as floats holding integers, in K-chunks short
enough that every partial sum stays below 2**24, so each fp32 product and sum is exact, on any
device and in any summation order (TF32 included); on CUDA the codes travel as bfloat16 (exact for
integers of up to 8 bits) into a tensor-core GEMM that accumulates and returns fp32.  The chunk sums
are then combined exactly (the int32 accumulator of an integer kernel) and rounded once to fp32.
fp8 block products are summed in float64, which is exact for 128 products of two e4m3 values (their
significands span fewer than 53 bits); devices without float64 use float32 there.  Scaling then
happens in float32 (int schemes) or float64 (fp8), rounded once to fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.invariant import last_dim_sum
from .schemes import FP8_BLOCK

_EXACT_F32 = 1 << 24


def _batched(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *t.shape[-2:])


def int4_nibbles(packed: torch.Tensor):
    """The even- and odd-index int4 codes of packed bytes, int8 (arithmetic shifts sign-extend each
    nibble): ``unpack_int4(packed)[..., 0::2]`` and ``[..., 1::2]``."""
    return (packed << 4).view(torch.int8) >> 4, packed.view(torch.int8) >> 4


def int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """:func:`mojo_opset.quant.int4.unpack_int4` from :func:`int4_nibbles` (fewer passes)."""
    return torch.stack(int4_nibbles(packed), dim=-1).flatten(-2)


def _int_mm_dtype(device: torch.device) -> torch.dtype:
    # CUDA: bf16 operands with an fp32 result (torch.bmm's out_dtype, torch >= 2.8); elsewhere fp32
    if device.type == "cuda" and "dtype" in torch.ops.aten.bmm.overloads():
        return torch.bfloat16
    return torch.float32


def _exact_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype == torch.bfloat16:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a, b)


def _int_partials(a: torch.Tensor, b: torch.Tensor, group: int, bound: int) -> torch.Tensor:
    """fp32 ``[B, G, S, M, N]``: exact partial sums of ``a[..., m, k] * b[..., n, k]`` over S K-chunks
    of each group of ``group`` columns (B = the batch entries).

    a ``[..., M, K]``, b ``[..., N, K]`` hold integers with ``|a * b| <= bound``; b may also be packed
    int4 codes (uint8 ``[..., N, K/2]``), unpacked straight into the GEMM layout."""
    a, b = _batched(a), _batched(b)
    B, M, K = a.shape
    N, G = b.shape[1], K // group
    S = -(-group // ((_EXACT_F32 - 1) // bound))     # K-chunks per group, each short enough to be exact
    c = -(-group // S)
    pad = S * c - group
    dt = _int_mm_dtype(a.device)
    if b.dtype == torch.uint8 and (pad or c % 2):
        b = int4_codes(b)

    def chunked(t):                                  # [B, rows, K] -> [B*G*S, rows, c]
        rows = t.shape[1]
        out = torch.empty(B, G * S, rows, c, dtype=dt, device=t.device)
        if t.dtype == torch.uint8:                   # packed int4: each nibble to its column, no interleaving pass
            pairs = out.view(B, G * S, rows, c // 2, 2)
            for j, nibble in enumerate(int4_nibbles(t)):
                pairs[..., j].copy_(nibble.view(B, rows, G * S, c // 2).transpose(1, 2))
        else:
            if pad:
                t = F.pad(t.reshape(B, rows, G, group).to(dt), (0, pad))
            out.copy_(t.reshape(B, rows, G * S, c).transpose(1, 2))    # layout and dtype in one copy
        return out.view(B * G * S, rows, c)

    return _exact_bmm(chunked(a), chunked(b).transpose(1, 2)).view(B, G, S, M, N)


def int_group_sums(a: torch.Tensor, b: torch.Tensor, group: int, bound: int) -> torch.Tensor:
    """``out[..., m, n, g] = sum_{k in group g} a[..., m, k] * b[..., n, k]`` exactly, int64 ``[..., M, N, K/group]``.

    a ``[..., M, K]``, b ``[..., N, K]`` hold integers with ``|a * b| <= bound``."""
    acc = _int_partials(a, b, group, bound).to(torch.int64).sum(2)
    return acc.permute(0, 2, 3, 1).reshape(*a.shape[:-1], b.shape[-2], -1)


def _int_group_acc(a, b, group, bound) -> torch.Tensor:
    """:func:`int_group_sums` rounded once to fp32 (what ``.float()`` of the int64 sums gives), a view
    ``[B, M, N, G]`` (physically G outermost): one chunk is exact already, two are added in fp32 (a
    correctly rounded sum of two exact values), more are added in int64 first."""
    part = _int_partials(a, b, group, bound)
    S = part.shape[2]
    if S == 1:
        acc = part[:, :, 0]
    elif S == 2:
        acc = part[:, :, 0] + part[:, :, 1]
    else:
        acc = part.to(torch.int64).sum(2).float()
    return acc.permute(0, 2, 3, 1)


def linear_w8a8(xq, sx, wq, sw):
    """int8 x int8 per token / per channel: ``y = acc * s_x * s_w``, fp32 ``[..., M, N]``.

    xq ``[..., M, K]``, sx ``[..., M]``, wq ``[..., N, K]``, sw ``[..., N]``."""
    acc = _int_group_acc(xq, wq, xq.shape[-1], 127 * 128)[..., 0]
    y = acc * _batched(sx.unsqueeze(-1)) * _batched(sw.unsqueeze(-2))
    return y.reshape(*xq.shape[:-1], -1)


def _group_sum(t: torch.Tensor, deterministic: bool) -> torch.Tensor:
    # a torch reduction's order follows the number of rows: the deterministic mode adds in group order
    return last_dim_sum(t) if deterministic else t.sum(-1)


def linear_w4a8(xq, sx, wq, sw, group, deterministic=False):
    """int8 tokens x int4 groups: ``y = s_x * sum_g s_w[n, g] * acc_g``, fp32 ``[..., M, N]``.

    wq: int4 codes ``[..., N, K]`` (int8), or packed (uint8 ``[..., N, K/2]``); sw ``[..., N, K/group]``.  The scaled group sums are
    laid out contiguously (groups innermost) before the sum, as for one 2-D call."""
    acc = _int_group_acc(xq, wq, group, 127 * 8)
    t = torch.mul(acc, _batched(sw).unsqueeze(1), out=torch.empty(acc.shape, dtype=torch.float32, device=acc.device))
    y = _group_sum(t, deterministic) * _batched(sx.unsqueeze(-1))
    return y.reshape(*xq.shape[:-1], -1)


def _fp8_acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def linear_fp8_block(xq, sx, wq, sw, deterministic=False):
    """fp8 tokens (per 128 columns) x fp8 128x128 blocks, fp32 ``[..., M, N]``:
    ``y[m, n] = sum_kb s_x[m, kb] * s_w[n // 128, kb] * sum_{k in kb} q_x[m, k] q_w[n, k]``.

    xq ``[..., M, KB*128]`` (zero-padded), sx ``[..., M, KB]``; wq ``[..., N, K]``; sw ``[..., ceil(N/128), KB]``.
    The block sums are laid out with the blocks outermost (as a bmm over blocks returns them), and
    so is their scaled copy that is summed."""
    lead = xq.shape[:-2]
    xq, sx, wq, sw = _batched(xq), _batched(sx), _batched(wq), _batched(sw)
    B, M, Kp = xq.shape
    N, K = wq.shape[1:]
    KB = Kp // FP8_BLOCK
    dt = _fp8_acc_dtype(xq.device)

    def blocks(t):                                   # [B, rows, Kp] -> [B*KB, rows, 128]
        rows = t.shape[1]
        out = torch.empty(B, KB, rows, FP8_BLOCK, dtype=dt, device=t.device)
        out.copy_(t.reshape(B, rows, KB, FP8_BLOCK).transpose(1, 2))
        return out.view(B * KB, rows, FP8_BLOCK)

    wq = wq if K == Kp else F.pad(wq.to(dt), (0, Kp - K))
    acc = torch.bmm(blocks(xq), blocks(wq).transpose(1, 2)).view(B, KB, M, N).permute(0, 2, 3, 1)  # [B, M, N, KB]
    sw_rows = sw.to(dt).repeat_interleave(FP8_BLOCK, dim=1)[:, :N]                                # [B, N, KB]
    acc.mul_(sx.to(dt).unsqueeze(2)).mul_(sw_rows.unsqueeze(1))     # (acc * s_x) * s_w, in place
    return _group_sum(acc, deterministic).float().reshape(*lead, M, N)
