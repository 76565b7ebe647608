"""The router GEMM ``x @ gate_weight.T (+ gate_bias)``, optionally in fp32 with bf16-sized memory.

With ``router_dtype=torch.float32`` the GEMM runs in fp32 through a custom autograd function that
saves the *original* operands (e.g. bf16) rather than fp32 copies, computes the gradients in fp32
and returns them in the operands' own dtypes (when nothing needs a gradient, the same products run
without the autograd function: it costs microseconds of host time per call).  In the deterministic
mode the token-side products run on fixed-shape row blocks (:mod:`.invariant`).

On CUDA, bf16 or fp16 operands go straight into one GEMM with an fp32 result (``torch.mm``'s
``out_dtype``): the product of two such values is exact in fp32, so this is the fp32 GEMM of the
upcast operands (up to the order of the fp32 sums), without the two fp32 copies and on tensor cores.
"""
from __future__ import annotations

import torch

from ..modes import resolve
from . import invariant


def _mm(a, b, deterministic: bool):
    return invariant.matmul(a, b) if deterministic else torch.matmul(a, b)


class _Fp32RouterGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, deterministic=False):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.deterministic = deterministic
        return _fp32_logits(x, weight, bias, deterministic)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm(grad, weight.float(), ctx.deterministic).to(x.dtype)    # per token
        if ctx.needs_input_grad[1]:
            gw = torch.matmul(grad.t(), x.float()).to(weight.dtype)          # over tokens: deterministic
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            gb = grad.sum(0).to(ctx.bias_dtype)
        return gx, gw, gb, None


_HALF = (torch.bfloat16, torch.float16)
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()     # torch >= 2.8


def _fp32_logits(x, weight, bias, deterministic: bool):
    if (_MM_OUT_DTYPE and not deterministic and x.device.type == "cuda" and x.dtype in _HALF
            and weight.dtype == x.dtype and x.dim() == 2):
        logits = torch.mm(x, weight.t(), out_dtype=torch.float32)
    else:
        logits = _mm(x.float(), weight.float().t(), deterministic)
    if bias is not None:
        logits = logits + bias.float()
    return logits


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def router_logits(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None = None,
                  router_dtype: torch.dtype | None = torch.float32, deterministic: bool | None = None) -> torch.Tensor:
    """``x [T, H] @ gate_weight[E, H].T (+ gate_bias)``; fp32 when ``router_dtype`` is fp32.
    ``deterministic``: batch-invariant products (None: the mode of the calling context)."""
    det = resolve(deterministic)
    if router_dtype == torch.float32:
        if _needs_grad(x, gate_weight, gate_bias):
            return _Fp32RouterGemm.apply(x, gate_weight, gate_bias, det)
        return _fp32_logits(x, gate_weight, gate_bias, det)
    if router_dtype is not None and router_dtype != x.dtype:
        x, gate_weight = x.to(router_dtype), gate_weight.to(router_dtype)
        gate_bias = None if gate_bias is None else gate_bias.to(router_dtype)
    gate_weight = gate_weight.to(x.dtype)
    gate_bias = None if gate_bias is None else gate_bias.to(x.dtype)
    if det:
        logits = invariant.linear(x, gate_weight)
        return logits if gate_bias is None else logits + gate_bias
    return torch.nn.functional.linear(x, gate_weight, gate_bias)
