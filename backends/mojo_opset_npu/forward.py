"""moe_forward: the whole routed-expert chain on torch_npu operators, in one custom op.

init_routing_v2 (sort) -> grouped_matmul (w13) -> swiglu -> grouped_matmul (w2) -> unpermute.
No group padding is needed, so no row of the chain is wasted.
"""
from __future__ import annotations

import torch

from mojo_opset.contract.names import MOE_FORWARD

from .combine import unpermute, unpermute_op_reasons
from .experts import GEMM_DTYPES, GMM_LIMITS, experts_reasons, swiglu_experts
from .permute import init_routing, routing_reasons
from .platform import NpuOpImpl


def moe_forward(x, topk_ids, topk_weights, w13, w2):
    rows, pair_row, counts = init_routing(x, topk_ids, w13.shape[0])
    y = swiglu_experts(rows, torch.cumsum(counts, 0), w13, w2)
    return unpermute(y, pair_row, topk_weights)


def forward_reasons(topk_ids) -> list[str]:
    """Routing and combine reasons of a whole forward (the experts' reasons are scheme-specific)."""
    return routing_reasons(topk_ids) + unpermute_op_reasons()


class NpuMoeForward(NpuOpImpl):
    op = MOE_FORWARD
    dtypes = GEMM_DTYPES        # SwiGLU only: ``activation`` is not declared
    limits = GMM_LIMITS         # tighter than init_routing_v2's 10240 experts

    def extra_reasons(self, call):
        out = forward_reasons(call.topk_ids)
        return out + [r for r in experts_reasons(call.x, call.w13, call.w2, x_name="x") if r not in out]

    def forward(self, call):
        return torch.ops.mojo_npu.moe_forward(call.x, call.topk_ids, call.topk_weights, call.w13, call.w2)
