"""Every npu launcher as a ``torch.library`` custom op (namespace ``mojo_npu``) with a fake impl.

This is the backend's only registration module: the op modules hold the launchers and call
``torch.ops.mojo_npu.*`` at run time; the backend imports this module when it loads.  Fake (meta)
implementations give the op contract's output shapes without running anything, so
``torch.compile(fullgraph=True)`` traces whole MoE layers.  Outputs never alias inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mojo_opset.contract import shapes

from . import combine as _combine
from . import experts as _experts
from . import forward as _forward
from . import gating as _gating
from . import permute as _permute
from . import quant_forward as _quant


@torch.library.custom_op("mojo_npu::gating", mutates_args=())
def gating(logits: Tensor, top_k: int, sigmoid: bool, route_norm: bool, route_scale: float,
           expert_bias: Optional[Tensor], group_count: int, k_group: int,
           group_select_mode: int) -> tuple[Tensor, Tensor, Tensor]:
    return _gating.gating_top_k(logits, top_k, sigmoid, route_norm, route_scale, expert_bias, group_count, k_group,
                                group_select_mode)


@gating.register_fake
def _(logits, top_k, sigmoid, route_norm, route_scale, expert_bias, group_count, k_group, group_select_mode):
    return shapes.gating_outputs(logits, top_k)


@torch.library.custom_op("mojo_npu::permute", mutates_args=())
def permute(x: Tensor, topk_ids: Tensor, num_experts: int, align: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _permute.permute(x, topk_ids, num_experts, align)


@permute.register_fake
def _(x, topk_ids, num_experts, align):
    return shapes.permute_outputs(x, topk_ids, num_experts, align)


@torch.library.custom_op("mojo_npu::experts", mutates_args=())
def experts(permuted_x: Tensor, group_ends: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    return _experts.experts(permuted_x, group_ends, w13, w2)


@experts.register_fake
def _(permuted_x, group_ends, w13, w2):
    return permuted_x.new_empty((permuted_x.shape[0], w2.shape[1]))


@torch.library.custom_op("mojo_npu::combine", mutates_args=())
def combine(expert_out: Tensor, pair_row: Tensor, topk_weights: Tensor) -> Tensor:
    return _combine.unpermute(expert_out, pair_row, topk_weights)


@combine.register_fake
def _(expert_out, pair_row, topk_weights):
    return shapes.combine_output(expert_out, topk_weights.shape[0])


@torch.library.custom_op("mojo_npu::moe_forward", mutates_args=())
def moe_forward(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    return _forward.moe_forward(x, topk_ids, topk_weights, w13, w2)


@moe_forward.register_fake
def _(x, topk_ids, topk_weights, w13, w2):
    return torch.empty_like(x)


@torch.library.custom_op("mojo_npu::w8a8_int8_moe_forward", mutates_args=())
def w8a8_int8_moe_forward(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13_q: Tensor, w13_scale: Tensor,
                          w2_q: Tensor, w2_scale: Tensor) -> Tensor:
    return _quant.w8a8_int8_forward(x, topk_ids, topk_weights, w13_q, w13_scale, w2_q, w2_scale)


@torch.library.custom_op("mojo_npu::w8a16_int8_moe_forward", mutates_args=())
def w8a16_int8_moe_forward(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13_q: Tensor, w13_scale: Tensor,
                           w2_q: Tensor, w2_scale: Tensor) -> Tensor:
    return _quant.w8a16_int8_forward(x, topk_ids, topk_weights, w13_q, w13_scale, w2_q, w2_scale)


def _quant_fake(x, topk_ids, topk_weights, w13_q, w13_scale, w2_q, w2_scale):
    return torch.empty_like(x)


w8a8_int8_moe_forward.register_fake(_quant_fake)
w8a16_int8_moe_forward.register_fake(_quant_fake)
