"""moe_gating on ``torch_npu.npu_moe_gating_top_k`` (softmax or sigmoid, expert bias, group-limited).

The operator's selection is documented as a stable descending sort (ties -> lower expert id), the
same rule as the reference.  It is always fed fp32 logits: the cast is exact, the expert bias then
keeps its fp32 precision (the operator takes the bias in the logits' dtype, and a bf16-rounded bias
can change which experts win) and the weights come back in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
from mojo_opset.backend import OpImpl

from .runtime import device_reason, missing_ops, torch_npu_module, version_tuple

MAX_EXPERTS = 2048
GATING_OP = "npu_moe_gating_top_k"
# torch_npu releases before 2.7.1 (op-plugin 7.0/7.1) documented only DeepSeek-V3's configuration.
GENERAL_FORM_SINCE = (2, 7)
GROUP_SELECT_MODE = {"max": 0, "top2_sum": 1}


def operator_groups(num_expert_groups: int, num_limited_groups: int) -> tuple[int, int]:
    """``(group_count, k_group)`` for the operator: keeping every group is no group limit."""
    if num_limited_groups >= num_expert_groups:
        return 1, 1
    return num_expert_groups, num_limited_groups


@torch.library.custom_op("mojo_npu::gating", mutates_args=())
def gating_kernel(logits: torch.Tensor, top_k: int, sigmoid: bool, route_norm: bool, route_scale: float,
                  expert_bias: Optional[torch.Tensor], group_count: int, k_group: int,
                  group_select_mode: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


@gating_kernel.register_fake
def _(logits, top_k, sigmoid, route_norm, route_scale, expert_bias, group_count, k_group, group_select_mode):
    T, E = logits.shape
    return (logits.new_empty((T, top_k), dtype=torch.int32), logits.new_empty((T, top_k), dtype=torch.float32),
            logits.new_empty((T, E), dtype=torch.float32))


class NpuGating(OpImpl):
    op = "moe_gating"
    supports_autograd = False  # the core rebuilds differentiable weights from the ids

    def reasons(self, logits, top_k, score_func="softmax", route_norm=False, route_scale=1.0,
                expert_bias=None, num_expert_groups=1, num_limited_groups=1, group_score="top2_sum",
                forced_expert_ids=None, **_):
        out = []
        if forced_expert_ids is not None:
            out.append("forced_expert_ids (router replay): npu_moe_gating_top_k always chooses its own experts")
        out += missing_ops(GATING_OP, since="2.5.1")
        r = device_reason("logits", logits)
        if r:
            out.append(r)
        T, E = logits.shape
        if T == 0:
            out.append("T = 0: nothing to route")
        if E > MAX_EXPERTS:
            out.append(f"E = {E} experts: npu_moe_gating_top_k supports at most {MAX_EXPERTS}")
        G, L = operator_groups(num_expert_groups, num_limited_groups)
        if E // G <= 2:
            out.append(f"{E // G} experts per group: npu_moe_gating_top_k needs more than 2 per group")
        if out:
            return out
        if version_tuple() < GENERAL_FORM_SINCE and not (E == 256 and G == 8 and L == 4
                                                          and expert_bias is not None):
            out.append(f"torch_npu {'.'.join(map(str, version_tuple()))} documents npu_moe_gating_top_k only for DeepSeek-V3's "
                       "routing (E = 256, 8 groups / 4 kept, expert bias); other configurations need "
                       "torch_npu >= 2.7.1")
        return out

    def cache_key(self, logits, top_k, score_func="softmax", route_norm=False, route_scale=1.0,
                  expert_bias=None, num_expert_groups=1, num_limited_groups=1, group_score="top2_sum",
                  forced_expert_ids=None, **_):
        return (logits.device.type, logits.shape[0] == 0, logits.shape[1], expert_bias is None,
                num_expert_groups, num_limited_groups, forced_expert_ids is None)

    def forward(self, logits, top_k, score_func="softmax", route_norm=False, route_scale=1.0,
                expert_bias=None, num_expert_groups=1, num_limited_groups=1, group_score="top2_sum",
                forced_expert_ids=None, **_):
        G, L = operator_groups(num_expert_groups, num_limited_groups)
        return gating_kernel(logits, top_k, score_func == "sigmoid", route_norm, float(route_scale),
                             expert_bias, G, L, GROUP_SELECT_MODE[group_score])
