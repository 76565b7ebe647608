"""int4 packing: two two's-complement codes per byte along K, the even index in the low nibble."""
from __future__ import annotations

import torch

from ..validation import check_tensor, fail

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int codes in [-8, 7] shaped ``[..., K]`` (K even) -> uint8 ``[..., K/2]``.

    Byte j holds ``q[..., 2j]`` in bits 0-3 and ``q[..., 2j+1]`` in bits 4-7, each as a 4-bit two's
    complement value (-1 -> 0xF, -8 -> 0x8)."""
    check_tensor("q", q, dtypes=_INT_DTYPES)
    if q.dim() < 1 or q.shape[-1] % 2:
        fail(f"q must have an even last dimension (two int4 codes per byte), got shape {list(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        fail(f"q must hold int4 codes in [-8, 7], got values in [{int(q.min())}, {int(q.max())}]")
    u = q.to(torch.int16) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K/2]`` -> int8 codes ``[..., K]`` in [-8, 7] (the inverse of :func:`pack_int4`)."""
    check_tensor("packed", packed, dtypes=(torch.uint8,))
    p = packed.to(torch.int16)
    v = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
    return torch.where(v >= 8, v - 16, v).to(torch.int8)
