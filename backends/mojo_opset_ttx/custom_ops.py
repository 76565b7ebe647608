"""Every ttx kernel as a ``torch.library`` custom op (namespace ``mojo_ttx``) with a fake impl.

This is the backend's only registration module: the op modules call ``torch.ops.mojo_ttx.*`` at run
time, and the backend imports this module when it loads.  Fake (meta) implementations give output
shapes without running anything, so ``torch.compile(fullgraph=True)`` traces through the ops.
Output sizes never depend on the data: permute returns the worst-case row count
(:class:`mojo_opset.contract.PermuteCall`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mojo_opset.contract import shapes

from . import combine_kernel, experts_kernel, gating_kernel, permute_kernel
from .platform import kernels_interpreted

kernels_interpreted()  # fixed now: triton.jit has just read TRITON_INTERPRET while building the kernels


@torch.library.custom_op("mojo_ttx::gating", mutates_args=())
def gating(logits: Tensor, top_k: int, score_func: str, route_norm: bool, route_scale: float,
           expert_bias: Optional[Tensor], num_expert_groups: int, num_limited_groups: int,
           group_score: str) -> Tuple[Tensor, Tensor, Tensor]:
    return gating_kernel.gating(logits, top_k, score_func, route_norm, route_scale, expert_bias,
                                num_expert_groups, num_limited_groups, group_score)


@gating.register_fake
def _(logits, top_k, score_func, route_norm, route_scale, expert_bias, num_expert_groups,
      num_limited_groups, group_score):
    return shapes.gating_outputs(logits, top_k)


@torch.library.custom_op("mojo_ttx::permute", mutates_args=())
def permute(x: Tensor, topk_ids: Tensor, num_experts: int, align: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return permute_kernel.permute(x, topk_ids, num_experts, align)


@permute.register_fake
def _(x, topk_ids, num_experts, align):
    return shapes.permute_outputs(x, topk_ids, num_experts, align)


@torch.library.custom_op("mojo_ttx::experts", mutates_args=())
def experts(permuted_x: Tensor, group_ends: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    return experts_kernel.experts(permuted_x, group_ends, w13, w2)


@experts.register_fake
def _(permuted_x, group_ends, w13, w2):
    return permuted_x.new_empty(permuted_x.shape[0], w2.shape[1])


@torch.library.custom_op("mojo_ttx::combine", mutates_args=())
def combine(expert_out: Tensor, pair_row: Tensor, topk_weights: Tensor, num_tokens: int) -> Tensor:
    return combine_kernel.combine(expert_out, pair_row, topk_weights, num_tokens)


@combine.register_fake
def _(expert_out, pair_row, topk_weights, num_tokens):
    return shapes.combine_output(expert_out, num_tokens)
