"""moe_gating on the ttx routing kernel (``gating_kernel``, op ``mojo_ttx::gating``).

Scores, expert bias, group limiting, renormalisation and scale are declared options; router replay
(``forced_expert_ids``) is not, so replayed calls go to the reference.
"""
from __future__ import annotations

import torch

from mojo_opset.contract.names import MOE_GATING

from . import gating_kernel
from .platform import TtxOpImpl

SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")


class Gating(TtxOpImpl):
    op = MOE_GATING
    options = frozenset({"score_func", "route_norm", "route_scale", "expert_bias", "num_expert_groups",
                         "group_score"})
    limits = {"num_experts": gating_kernel.MAX_EXPERTS}  # a row tile must fit the on-chip buffer

    def extra_reasons(self, call):
        out = super().extra_reasons(call)
        r = call.routing
        # values the kernel was written for: a value added to the contract later is declined, not misread
        if r.score_func not in SCORE_FUNCS:
            out.append(f"score_func {r.score_func!r} is not implemented by the ttx routing kernel")
        if r.group_score not in GROUP_SCORES:
            out.append(f"group_score {r.group_score!r} is not implemented by the ttx routing kernel")
        return out

    def forward(self, call):
        r = call.routing
        return torch.ops.mojo_ttx.gating(call.logits, r.top_k, r.score_func, r.route_norm, float(r.route_scale),
                                         r.expert_bias, r.num_expert_groups, r.num_limited_groups, r.group_score)
