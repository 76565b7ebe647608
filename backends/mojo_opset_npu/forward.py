"""moe_forward: the whole routed-expert chain on torch_npu operators, in one custom op.

init_routing_v2 (sort) -> grouped_matmul (w13) -> swiglu -> grouped_matmul (w2) -> unpermute.
No group padding is needed, so no row of the chain is wasted.
"""
from __future__ import annotations

import torch
from mojo_opset.backend import OpImpl

from .combine import unpermute, unpermute_op_reasons
from .experts import experts_reasons, swiglu_experts
from .permute import init_routing, routing_reasons
from .runtime import device_reason


@torch.library.custom_op("mojo_npu::moe_forward", mutates_args=())
def moe_forward_kernel(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    E = w13.shape[0]
    rows, pair_row, counts = init_routing(x, topk_ids, E)
    y = swiglu_experts(rows, torch.cumsum(counts, 0), w13, w2)
    return unpermute(y, pair_row, topk_weights)


@moe_forward_kernel.register_fake
def _(x, topk_ids, topk_weights, w13, w2):
    return torch.empty_like(x)


def forward_reasons(x, topk_ids, topk_weights, E) -> list[str]:
    """Routing and combine reasons of a whole forward (the experts' reasons are scheme-specific)."""
    out = routing_reasons(x, topk_ids, E) + unpermute_op_reasons()
    r = device_reason("topk_weights", topk_weights)
    return out + [r] if r else out


class NpuMoeForward(OpImpl):
    op = "moe_forward"
    supports_autograd = False

    def reasons(self, x, topk_ids, topk_weights, w13, w2, activation="swiglu", **_):
        out = forward_reasons(x, topk_ids, topk_weights, w13.shape[0])
        out += [r for r in experts_reasons(x, w13, w2, activation, x_name="x") if r not in out]
        return out

    def cache_key(self, x, topk_ids, topk_weights, w13, w2, activation="swiglu", **_):
        return (x.device.type, x.dtype, x.shape[0] == 0, topk_ids.device.type, topk_ids.dtype,
                topk_ids.numel() >= 2 ** 31, topk_weights.device.type, w13.device.type, w2.device.type,
                w13.dtype, w2.dtype, tuple(w13.shape), w13.is_contiguous(), w2.is_contiguous(), activation)

    def forward(self, x, topk_ids, topk_weights, w13, w2, activation="swiglu", **_):
        return moe_forward_kernel(x, topk_ids, topk_weights, w13, w2)
