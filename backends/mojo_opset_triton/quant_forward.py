"""The quantized-experts ops on the triton backend: ``quant_moe_forward`` (the routed experts of a
layer, fused like ``moe_forward``) and ``moe_quant_experts`` (expert-sorted rows), both on the
kernels of ``quant_launch.py`` for every scheme.

Declared: float activations (fp32, fp16, bf16), SwiGLU only (``activation`` is not declared), no
activation smoothing (``activation_smoothing`` is not declared), not differentiable (a call that
needs gradients goes to the reference).  Besides: CUDA tensors, or CPU tensors in the Triton
interpreter except fp8 (the interpreter has no float8); int4 group sizes that are powers of two
>= 16; at most 1024 experts.
"""
from __future__ import annotations

import torch

from mojo_opset.backend import OpImpl
from mojo_opset.contract.names import MOE_QUANT_EXPERTS, QUANT_MOE_FORWARD

from .align_kernel import MAX_EXPERTS
from .platform import TritonOpImpl, eager
from .quant_launch import quant_experts_rows, quant_fused_moe_forward, quant_reasons


class _QuantImpl(TritonOpImpl):
    """Eager calls launch the kernels directly; traced ones (``torch.compile``, dispatch modes) go
    through the ``torch.library`` ops."""

    limits = {"num_experts": MAX_EXPERTS}
    supports_autograd = False

    def _reasons(self, data: torch.Tensor, q) -> list[str]:
        return quant_reasons(data, q.scheme, q.group_size, q.num_experts)


class TritonQuantMoeForward(_QuantImpl):
    op = QUANT_MOE_FORWARD

    def extra_reasons(self, call):
        out = self._reasons(call.x, call.qexperts)
        if call.topk_ids.dtype.is_floating_point:
            out.append("topk_ids must be an integer tensor")
        return out

    def forward(self, call):
        q = call.qexperts
        if eager():
            return quant_fused_moe_forward(call.x, call.topk_ids, call.topk_weights, q.scheme, q.w13_q,
                                           q.w13_scale, q.w2_q, q.w2_scale, q.group_size)
        return torch.ops.mojo_triton.quant_moe(call.x, call.topk_ids, call.topk_weights, q.w13_q, q.w13_scale,
                                               q.w2_q, q.w2_scale, q.scheme, q.group_size or 0)


class TritonQuantExperts(_QuantImpl):
    op = MOE_QUANT_EXPERTS

    def extra_reasons(self, call):
        return self._reasons(call.permuted_x, call.qexperts)

    def forward(self, call):
        q = call.qexperts
        if eager():
            return quant_experts_rows(call.permuted_x, call.group_ends, q.scheme, q.w13_q, q.w13_scale,
                                      q.w2_q, q.w2_scale, q.group_size)
        return torch.ops.mojo_triton.quant_experts(call.permuted_x, call.group_ends, q.w13_q, q.w13_scale, q.w2_q,
                                                   q.w2_scale, q.scheme, q.group_size or 0)


def quant_impls() -> dict[str, OpImpl]:
    """``{op: OpImpl}`` for the backend's ``load()``."""
    return {QUANT_MOE_FORWARD: TritonQuantMoeForward(), MOE_QUANT_EXPERTS: TritonQuantExperts()}
