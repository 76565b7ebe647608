"""moe_gating on ``torch_npu.npu_moe_gating_top_k`` (softmax or sigmoid, expert bias, group-limited).

The operator's selection is documented as a stable descending sort (ties -> lower expert id), the
same rule as the reference.  It is always fed fp32 logits: the cast is exact, the expert bias then
keeps its fp32 precision (the operator takes the bias in the logits' dtype, and a bf16-rounded bias
can change which experts win) and the weights come back in fp32.
"""
from __future__ import annotations

import torch

from mojo_opset.contract.names import MOE_GATING

from .platform import NpuOpImpl, missing_ops, release, torch_npu_module, version_tuple

MAX_EXPERTS = 2048
GATING_OP = "npu_moe_gating_top_k"
# torch_npu releases before 2.7.1 (op-plugin 7.0/7.1) documented only DeepSeek-V3's configuration.
GENERAL_FORM_SINCE = (2, 7)
GROUP_SELECT_MODE = {"max": 0, "top2_sum": 1}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def gating_top_k(logits, top_k, sigmoid, route_norm, route_scale, expert_bias, group_count, k_group,
                 group_select_mode):
    """``(ids int32 [T, K], weights fp32 [T, K], scores fp32 [T, E])`` from the operator."""
    npu = torch_npu_module()
    x = logits.float().contiguous()
    bias = None if expert_bias is None else expert_bias.float().contiguous()
    # the sigmoid form always renormalises, then scales: the reference's order when route_norm is set
    fused_scale = route_scale if (sigmoid and route_norm) else 1.0
    y, idx, scores = npu.npu_moe_gating_top_k(
        x, top_k, bias=bias, k_group=k_group, group_count=group_count, group_select_mode=group_select_mode,
        renorm=0, norm_type=1 if sigmoid else 0, out_flag=True, routed_scaling_factor=fused_scale, eps=1e-20)
    scores = scores.float()
    ids = idx.to(torch.int32)
    if sigmoid and not route_norm:
        # the operator cannot skip the renormalisation: weights come from its unnormalised scores
        w = scores.gather(1, ids.long())
        weights = w * route_scale if route_scale != 1.0 else w
    elif sigmoid:
        weights = y.float()
    else:
        w = y.float()
        if route_norm:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        weights = w * route_scale if route_scale != 1.0 else w
    return ids, weights, scores


class NpuGating(NpuOpImpl):
    op = MOE_GATING
    dtypes = FLOAT_DTYPES       # always cast to fp32 for the operator (exact)
    # router replay is not declared: the operator always chooses its own experts
    options = frozenset({"score_func", "route_norm", "route_scale", "expert_bias", "num_expert_groups",
                         "group_score"})
    limits = {"num_experts": MAX_EXPERTS}

    def extra_reasons(self, call):
        r = call.routing
        out = missing_ops(GATING_OP, since="2.5.1")
        T, E = call.logits.shape
        if T == 0:
            out.append("T = 0: nothing to route")
        G, L = r.num_expert_groups, r.num_limited_groups   # G = L = 1: no group limit (the core's normal form)
        if E // G <= 2:
            out.append(f"{E // G} experts per group: npu_moe_gating_top_k needs more than 2 per group")
        if out:
            return out
        if version_tuple() < GENERAL_FORM_SINCE and not (E == 256 and G == 8 and L == 4
                                                          and r.expert_bias is not None):
            out.append(f"torch_npu {release()} documents npu_moe_gating_top_k only for DeepSeek-V3's "
                       "routing (E = 256, 8 groups / 4 kept, expert bias); other configurations need "
                       "torch_npu >= 2.7.1")
        return out

    def forward(self, call):
        r = call.routing
        return torch.ops.mojo_npu.gating(call.logits, r.top_k, r.score_func == "sigmoid", r.route_norm,
                                         float(r.route_scale), r.expert_bias, r.num_expert_groups,
                                         r.num_limited_groups, GROUP_SELECT_MODE[r.group_score])
