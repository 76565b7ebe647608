"""Grouped SwiGLU experts over expert-sorted rows (SPEC §3.3).

Two reference paths with the same numerics contract (GEMM outputs rounded to the input dtype,
SwiGLU in fp32 then rounded): a per-expert loop (any device/dtype; reads the group sizes on the
host) and ``torch._grouped_mm`` (no host sync; where available).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .experts_op import experts_loop_op

ACTIVATIONS = ("swiglu",)


def swiglu(h: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``silu(gate) * up`` of ``h = [gate | up]`` along the last dim, computed in fp32."""
    g, u = h.float().chunk(2, dim=-1)
    return (F.silu(g) * u).to(out_dtype)


def experts_loop(permuted_x, group_ends, w13, w2, activation="swiglu"):
    R, dtype = permuted_x.shape[0], permuted_x.dtype
    y = permuted_x.new_zeros(R, w2.shape[1])
    ends = group_ends.tolist()
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            xs = permuted_x[start:end]
            a = swiglu(F.linear(xs, w13[e].to(dtype)), dtype)
            y[start:end] = F.linear(a, w2[e].to(dtype))
        start = end
    return y


@functools.lru_cache(maxsize=None)
def grouped_mm_available(device_type: str, dtype: torch.dtype, capability: tuple | None) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device_type == "cuda":
        return dtype == torch.bfloat16 and capability is not None and capability >= (9, 0)
    return device_type == "cpu" and dtype in (torch.bfloat16, torch.float16, torch.float32)


def can_use_grouped_mm(t: torch.Tensor, w2: torch.Tensor | None = None) -> bool:
    """Whether ``experts_grouped_mm`` runs for these operands: ``torch._grouped_mm`` needs every
    operand's row stride (H and I elements) to be a multiple of 16 bytes."""
    size = t.element_size()
    if t.shape[-1] * size % 16 or (w2 is not None and w2.shape[-1] * size % 16):
        return False
    cap = torch.cuda.get_device_capability(t.device) if t.device.type == "cuda" else None
    return grouped_mm_available(t.device.type, t.dtype, cap)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on a 16-byte boundary, as ``torch._grouped_mm`` requires: a
    contiguous view that starts mid-storage (a slice of a flat parameter buffer, say) is copied."""
    t = t.contiguous()
    if torch.compiler.is_compiling():   # no data pointers while tracing; Inductor copies misaligned inputs
        return t
    return t if t.data_ptr() % 16 == 0 else t.clone()


def experts_grouped_mm(permuted_x, group_ends, w13, w2, activation="swiglu"):
    dtype = permuted_x.dtype
    ends = group_ends.to(torch.int32)
    permuted_x = _aligned(permuted_x)
    w13, w2 = _aligned(w13.to(dtype)), _aligned(w2.to(dtype))  # row strides of 16 bytes, aligned starts
    h = torch._grouped_mm(permuted_x, w13.transpose(1, 2), offs=ends)
    a = swiglu(h, dtype)
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=ends)
    R = permuted_x.shape[0]
    valid = torch.arange(R, device=permuted_x.device) < ends[-1]  # rows past the groups are zero
    return torch.where(valid[:, None], y, y.new_zeros(()))


def experts_reference(permuted_x, group_ends, w13, w2, activation="swiglu"):
    """The core path: ``torch._grouped_mm`` on CUDA (Hopper+, bf16), the per-expert loop elsewhere
    (as the ``mojo_opset::experts_loop`` custom op when compiling: the loop reads sizes on the host)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    if permuted_x.device.type == "cuda" and can_use_grouped_mm(permuted_x, w2):
        return experts_grouped_mm(permuted_x, group_ends, w13, w2, activation)
    if torch.compiler.is_compiling():
        return experts_loop_op(permuted_x, group_ends, w13, w2)
    return experts_loop(permuted_x, group_ends, w13, w2, activation)
