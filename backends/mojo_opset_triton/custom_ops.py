"""Kernel entry points as torch.library custom ops (namespace ``mojo_triton``) with fake impls,
so ``torch.compile(fullgraph=True)`` traces through them; ``fused_moe`` is differentiable."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mojo_opset.ops import shapes

from . import align as _align
from . import combine as _combine
from . import moe as _moe
from . import routing as _routing


@torch.library.custom_op("mojo_triton::moe_gating", mutates_args=())
def moe_gating(logits: Tensor, expert_bias: Optional[Tensor], forced_expert_ids: Optional[Tensor], top_k: int,
               score_func: str, route_norm: bool, route_scale: float, num_expert_groups: int,
               num_limited_groups: int, group_score: str) -> tuple[Tensor, Tensor, Tensor]:
    return _routing.route(logits, expert_bias, forced_expert_ids, top_k, score_func, route_norm, route_scale,
                          num_expert_groups, num_limited_groups, group_score)


@moe_gating.register_fake
def _(logits, expert_bias, forced_expert_ids, top_k, score_func, route_norm, route_scale, num_expert_groups,
      num_limited_groups, group_score):
    return shapes.gating_outputs(logits, top_k)


@torch.library.custom_op("mojo_triton::moe_permute", mutates_args=())
def moe_permute(x: Tensor, topk_ids: Tensor, num_experts: int, align: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _align.permute(x, topk_ids, num_experts, align)


@moe_permute.register_fake
def _(x, topk_ids, num_experts, align):
    return shapes.permute_outputs(x, topk_ids, num_experts, align)


@torch.library.custom_op("mojo_triton::moe_combine", mutates_args=())
def moe_combine(expert_out: Tensor, pair_row: Tensor, topk_weights: Tensor, num_tokens: int) -> Tensor:
    return _combine.combine(expert_out, pair_row, topk_weights, num_tokens)


@moe_combine.register_fake
def _(expert_out, pair_row, topk_weights, num_tokens):
    return shapes.combine_output(expert_out, num_tokens)


@torch.library.custom_op("mojo_triton::fused_moe", mutates_args=())
def fused_moe(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    return _moe.fused_moe_forward(x, topk_ids, topk_weights, w13, w2)


@fused_moe.register_fake
def _(x, topk_ids, topk_weights, w13, w2):
    return x.new_empty(x.shape[0], w2.shape[1])


@torch.library.custom_op("mojo_triton::fused_moe_backward", mutates_args=())
def fused_moe_backward(grad_out: Tensor, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor,
                       w2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _moe.reference_backward(grad_out, x, topk_ids, topk_weights, w13, w2)


@fused_moe_backward.register_fake
def _(grad_out, x, topk_ids, topk_weights, w13, w2):
    return (torch.empty_like(x), torch.empty_like(topk_weights), torch.empty_like(w13), torch.empty_like(w2))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    x, topk_ids, topk_weights, w13, w2 = ctx.saved_tensors
    dx, dw, d13, d2 = fused_moe_backward(grad_out.contiguous(), x, topk_ids, topk_weights, w13, w2)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, None, dw if need[2] else None, d13 if need[3] else None,
            d2 if need[4] else None)


torch.library.register_autograd("mojo_triton::fused_moe", _backward, setup_context=_setup_context)
