"""The backend's OpImpls: what each op serves, and the reasons it declines a call."""
from __future__ import annotations

import torch

from mojo_opset.backend import OpImpl
from mojo_opset.ops.names import MOE_COMBINE, MOE_FORWARD, MOE_GATING, MOE_PERMUTE

from ._env import device_reason, interpreter_on
from .align import MAX_EXPERTS
from .routing import routing_reasons

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


class GatingImpl(OpImpl):
    op = MOE_GATING
    supports_autograd = False  # the core rebuilds differentiable weights from the returned ids

    def reasons(self, *, logits, top_k, score_func, group_score, num_expert_groups, num_limited_groups, **_):
        out = []
        r = device_reason(logits)
        if r:
            out.append(r)
        return out + routing_reasons(logits, top_k, score_func, group_score, num_expert_groups,
                                     num_limited_groups)

    def cache_key(self, *, logits, top_k, score_func, group_score, num_expert_groups, num_limited_groups, **_):
        return (logits.device.type, interpreter_on(), logits.dtype, logits.shape[1], top_k, score_func,
                group_score, num_expert_groups, num_limited_groups)

    def forward(self, *, logits, top_k, score_func, route_norm, route_scale, expert_bias, num_expert_groups,
                num_limited_groups, group_score, forced_expert_ids):
        bias = expert_bias.float().contiguous() if expert_bias is not None else None
        return torch.ops.mojo_triton.moe_gating(logits, bias, forced_expert_ids, top_k, score_func, route_norm,
                                                float(route_scale), num_expert_groups, num_limited_groups,
                                                group_score)


class PermuteImpl(OpImpl):
    op = MOE_PERMUTE

    def reasons(self, *, x, topk_ids, num_experts, align, **_):
        out = []
        r = device_reason(x)
        if r:
            out.append(r)
        if num_experts > MAX_EXPERTS:
            out.append(f"num_experts = {num_experts} is over the align kernel's limit of {MAX_EXPERTS}")
        return out

    def cache_key(self, *, x, topk_ids, num_experts, align, **_):
        return (x.device.type, interpreter_on(), num_experts)

    def forward(self, *, x, topk_ids, num_experts, align):
        return torch.ops.mojo_triton.moe_permute(x, topk_ids, num_experts, align)


class CombineImpl(OpImpl):
    op = MOE_COMBINE

    def reasons(self, *, expert_out, **_):
        r = device_reason(expert_out)
        return [r] if r else []

    def cache_key(self, *, expert_out, **_):
        return (expert_out.device.type, interpreter_on())

    def forward(self, *, expert_out, pair_row, topk_weights, num_tokens):
        return torch.ops.mojo_triton.moe_combine(expert_out, pair_row, topk_weights, num_tokens)


class ForwardImpl(OpImpl):
    """Fused experts; differentiable through a backward of reference torch ops."""

    op = MOE_FORWARD
    supports_autograd = True

    def reasons(self, *, x, topk_ids, topk_weights, w13, w2, activation, **_):
        out = []
        r = device_reason(x)
        if r:
            out.append(r)
        if activation != "swiglu":
            out.append(f"activation {activation!r} is not implemented (only 'swiglu')")
        if x.dtype not in _FLOATS:
            out.append(f"x dtype {_dtype_name(x.dtype)} is not served (bfloat16, float16, float32)")
        if w13.dtype != x.dtype or w2.dtype != x.dtype:
            out.append(f"expert weights ({_dtype_name(w13.dtype)}, {_dtype_name(w2.dtype)}) must have x's dtype "
                       f"{_dtype_name(x.dtype)}")
        if w13.shape[0] > MAX_EXPERTS:
            out.append(f"E = {w13.shape[0]} experts is over the align kernel's limit of {MAX_EXPERTS}")
        if topk_ids.dtype.is_floating_point:
            out.append("topk_ids must be an integer tensor")
        return out

    def cache_key(self, *, x, topk_ids, w13, w2, activation, **_):
        return (x.device.type, interpreter_on(), x.dtype, w13.dtype, w2.dtype, w13.shape[0], activation,
                topk_ids.dtype)

    def forward(self, *, x, topk_ids, topk_weights, w13, w2, activation):
        return torch.ops.mojo_triton.fused_moe(x, topk_ids, topk_weights, w13, w2)


def build_impls() -> dict[str, OpImpl]:
    from . import custom_ops  # noqa: F401  (registers the torch.library ops)

    return {MOE_GATING: GatingImpl(), MOE_PERMUTE: PermuteImpl(), MOE_COMBINE: CombineImpl(),
            MOE_FORWARD: ForwardImpl()}
