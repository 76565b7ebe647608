"""The router GEMM ``x @ gate_weight.T (+ gate_bias)``, optionally in fp32 with bf16-sized memory.

With ``router_dtype=torch.float32`` the GEMM runs in fp32 through a custom autograd function that
saves the *original* operands (e.g. bf16) rather than fp32 copies, computes the gradients in fp32
and returns them in the operands' own dtypes.
"""
from __future__ import annotations

import torch


class _Fp32RouterGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        logits = torch.matmul(x.float(), weight.float().t())
        if bias is not None:
            logits = logits + bias.float()
        return logits

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.matmul(grad, weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = torch.matmul(grad.t(), x.float()).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            gb = grad.sum(0).to(ctx.bias_dtype)
        return gx, gw, gb


def router_logits(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None = None,
                  router_dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """``x [T, H] @ gate_weight[E, H].T (+ gate_bias)``; fp32 when ``router_dtype`` is fp32."""
    if router_dtype == torch.float32:
        return _Fp32RouterGemm.apply(x, gate_weight, gate_bias)
    if router_dtype is not None and router_dtype != x.dtype:
        x, gate_weight = x.to(router_dtype), gate_weight.to(router_dtype)
        gate_bias = None if gate_bias is None else gate_bias.to(router_dtype)
    return torch.nn.functional.linear(x, gate_weight.to(x.dtype),
                                      None if gate_bias is None else gate_bias.to(x.dtype))
