"""moe_gating: the fused routing kernel (scores, group-limited top-k, weights; full replay).

Partial replay (-1 ids) is not declared: those calls run on the reference."""
from __future__ import annotations

import torch

from mojo_opset.contract.names import MOE_GATING

from .gating_kernel import route, routing_reasons
from .platform import TritonOpImpl, eager, serialized

ROUTING_OPTIONS = frozenset({"score_func", "route_norm", "route_scale", "expert_bias", "num_expert_groups",
                             "group_score", "forced_expert_ids"})


class GatingImpl(TritonOpImpl):
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
        op = route if eager() else torch.ops.mojo_triton.moe_gating
        with serialized():
            return op(call.logits, bias, r.forced_expert_ids, r.top_k, r.score_func, r.route_norm,
                      float(r.route_scale), r.num_expert_groups, r.num_limited_groups, r.group_score)
