"""Grouped SwiGLU experts over expert-sorted rows (SPEC §3.3).

Two reference paths with the same numerics contract (GEMM outputs rounded to the input dtype,
SwiGLU in fp32 then rounded): a per-expert loop (any device/dtype; reads the group sizes on the
host) and ``torch._grouped_mm`` (no host sync; where available).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .experts_loop import experts_loop
from .experts_op import experts_loop_op
from .fused import fused
from .swiglu import ACTIVATIONS, swiglu, swiglu_backward

__all__ = ["ACTIVATIONS", "swiglu", "experts_loop", "experts_grouped_mm", "experts_reference", "can_use_grouped_mm",
           "grouped_mm_available"]


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


@fused
def _swiglu(h):
    return swiglu(h, h.dtype)


@fused
def _swiglu_grad(h, grad_a):
    return swiglu_backward(h, grad_a).to(h.dtype)


class _SwiGLU(torch.autograd.Function):
    """SwiGLU in fp32 that saves only its input (no fp32 copies); autograd frees h as soon as
    this step's gradient is computed, before the first grouped GEMM's backward."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return _swiglu(h)

    @staticmethod
    def backward(ctx, grad_a):
        (h,) = ctx.saved_tensors
        return _swiglu_grad(h, grad_a)


def experts_grouped_mm(permuted_x, group_ends, w13, w2, activation="swiglu"):
    dtype = permuted_x.dtype
    ends = group_ends.to(torch.int32)
    permuted_x = _aligned(permuted_x)
    w13, w2 = _aligned(w13.to(dtype)), _aligned(w2.to(dtype))  # row strides of 16 bytes, aligned starts
    h = torch._grouped_mm(permuted_x, w13.transpose(1, 2), offs=ends)
    y = torch._grouped_mm(_SwiGLU.apply(h), w2.transpose(1, 2), offs=ends)
    R = permuted_x.shape[0]
    valid = torch.arange(R, device=permuted_x.device) < ends[-1]  # rows past the groups are zero
    return torch.where(valid[:, None], y, y.new_zeros(()))


def experts_reference(permuted_x, group_ends, w13, w2, activation="swiglu", deterministic=False):
    """The core path: ``torch._grouped_mm`` on CUDA (Hopper+, bf16), the per-expert loop elsewhere
    (as the ``mojo_opset::experts_loop`` custom op when compiling: the loop reads sizes on the host).
    ``deterministic``: the per-expert loop on fixed-shape GEMM blocks (batch-invariant; eager only:
    it reads the group sizes on the host)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    if permuted_x.device.type == "meta":      # shapes only (no values to loop over)
        return permuted_x.new_empty(permuted_x.shape[0], w2.shape[1])
    if deterministic:
        return experts_loop(permuted_x, group_ends, w13, w2, activation, deterministic=True)
    if permuted_x.device.type == "cuda" and can_use_grouped_mm(permuted_x, w2):
        return experts_grouped_mm(permuted_x, group_ends, w13, w2, activation)
    if torch.compiler.is_compiling():
        return experts_loop_op(permuted_x, group_ends, w13, w2)
    return experts_loop(permuted_x, group_ends, w13, w2, activation)
