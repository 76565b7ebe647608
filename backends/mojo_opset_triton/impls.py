"""The backend's OpImpls: declared capabilities, the reasons beyond them, and the calls into the
``mojo_triton`` custom ops.

Eager calls go straight to the kernels' Python entry points: a ``torch.library`` op costs tens of
microseconds of host time per call, and it is needed only where something traces the call (a
``torch.compile`` graph, a dispatch mode such as FakeTensorMode) or for the forward's autograd.

The ``deterministic`` option: routing (one program per token), combine (one program per token, the
K slots in order) and the fused forward (one tile configuration for every T) are batch-invariant;
the forward's backward is not declared so (its tiles follow T), so deterministic training calls
run on the reference.
"""
from __future__ import annotations

import torch

from mojo_opset.backend import OpImpl
from mojo_opset.contract.names import MOE_COMBINE, MOE_FORWARD, MOE_GATING, MOE_PERMUTE

from . import align as _align
from . import combine as _combine
from . import moe as _moe
from . import routing as _routing
from ._env import device_reason, interpreter_on, serialized
from .align import MAX_EXPERTS
from .routing import routing_reasons

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
ROUTING_OPTIONS = frozenset({"score_func", "route_norm", "route_scale", "expert_bias", "num_expert_groups",
                             "group_score", "forced_expert_ids"})


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)


def _eager() -> bool:
    """Nothing is tracing this call: the custom op may be skipped."""
    if torch.compiler.is_compiling():
        return False
    return _dispatch_modes is not None and _dispatch_modes() == 0


class _TritonImpl(OpImpl):
    dtypes = FLOATS

    def state_key(self):
        return interpreter_on()

    def extra_reasons(self, call) -> list[str]:
        r = device_reason(call.tensor)
        return [r] if r else []


class GatingImpl(_TritonImpl):
    op = MOE_GATING
    options = ROUTING_OPTIONS | {"deterministic"}    # partial replay (-1 ids) goes to the reference
    supports_autograd = False       # the core takes the gradient from the reference formulas

    def extra_reasons(self, call):
        r = call.routing
        return super().extra_reasons(call) + routing_reasons(call.logits, r.top_k, r.score_func, r.group_score,
                                                             r.num_expert_groups, r.num_limited_groups)

    def forward(self, call):
        r = call.routing
        bias = r.expert_bias.float().contiguous() if r.expert_bias is not None else None
        op = _routing.route if _eager() else torch.ops.mojo_triton.moe_gating
        with serialized():
            return op(call.logits, bias, r.forced_expert_ids, r.top_k, r.score_func, r.route_norm,
                      float(r.route_scale), r.num_expert_groups, r.num_limited_groups, r.group_score)


class PermuteImpl(_TritonImpl):
    op = MOE_PERMUTE
    options = frozenset({"align"})
    limits = {"num_experts": MAX_EXPERTS}

    def forward(self, call):
        op = _align.permute if _eager() else torch.ops.mojo_triton.moe_permute
        with serialized():
            return op(call.x, call.topk_ids, call.num_experts, call.align)


class CombineImpl(_TritonImpl):
    op = MOE_COMBINE
    options = frozenset({"deterministic"})

    def forward(self, call):
        op = _combine.combine if _eager() else torch.ops.mojo_triton.moe_combine
        with serialized():
            return op(call.expert_out, call.pair_row, call.topk_weights, call.num_tokens)


class ForwardImpl(_TritonImpl):
    """Fused experts; differentiable through the backend's backward."""

    op = MOE_FORWARD
    options = frozenset({"deterministic"})
    supports_autograd = True
    deterministic_backward = False     # its backward's tiles follow T: deterministic training runs the reference
    limits = {"num_experts": MAX_EXPERTS}

    def extra_reasons(self, call):
        out = super().extra_reasons(call)
        x, w13, w2 = call.x, call.w13, call.w2
        if w13.dtype != x.dtype or w2.dtype != x.dtype:
            out.append(f"expert weights ({_dtype_name(w13.dtype)}, {_dtype_name(w2.dtype)}) must have x's dtype "
                       f"{_dtype_name(x.dtype)}")
        if call.topk_ids.dtype.is_floating_point:
            out.append("topk_ids must be an integer tensor")
        return out

    def forward(self, call):
        from .custom_ops import fused_moe_autograd

        args = (call.x, call.topk_ids, call.topk_weights, call.w13, call.w2)
        if call.deterministic:     # no gradient here (see deterministic_backward)
            if _eager():
                return _moe.fused_moe_forward(*args, deterministic=True)
            return torch.ops.mojo_triton.fused_moe_deterministic(*args)
        if _eager() and not call.needs_grad():
            return _moe.fused_moe_forward(*args)
        return fused_moe_autograd(*args)


def build_impls() -> dict[str, OpImpl]:
    from . import custom_ops  # noqa: F401  (registers the torch.library ops)

    from .quant_forward import quant_impls

    impls = {impl.op: impl for impl in (GatingImpl(), PermuteImpl(), CombineImpl(), ForwardImpl())}
    impls.update(quant_impls())        # quant_moe_forward (fused) and moe_quant_experts
    return impls
