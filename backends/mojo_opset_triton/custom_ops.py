"""Kernel entry points as torch.library custom ops (namespace ``mojo_triton``) with fake impls,
so ``torch.compile(fullgraph=True)`` traces through them.

``fused_moe`` (inference) and ``fused_moe_train`` (a training forward that also returns the
pre-activation ``h`` its backward needs) are differentiable through ``fused_moe_backward``
(``training.py``); ``fused_moe_autograd`` picks between the two."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mojo_opset.contract import shapes

from . import align_kernel as _align
from . import combine_kernel as _combine
from . import forward as _moe
from . import gating_kernel as _routing
from . import training as _training


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


@torch.library.custom_op("mojo_triton::fused_moe_deterministic", mutates_args=())
def fused_moe_deterministic(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """The batch-invariant forward (one tile configuration for every T); inference only: the
    dispatcher sends deterministic calls that need a gradient to the reference."""
    return _moe.fused_moe_forward(x, topk_ids, topk_weights, w13, w2, deterministic=True)


@fused_moe_deterministic.register_fake
def _(x, topk_ids, topk_weights, w13, w2):
    return x.new_empty(x.shape[0], w2.shape[1])


@torch.library.custom_op("mojo_triton::fused_moe_train", mutates_args=())
def fused_moe_train(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor,
                    w2: Tensor) -> tuple[Tensor, Tensor]:
    """The forward of a training step: ``(out, h)``, ``h`` [T*K, 2I] the pre-activation the backward
    needs."""
    return _training.forward(x, topk_ids, topk_weights, w13, w2)


@fused_moe_train.register_fake
def _(x, topk_ids, topk_weights, w13, w2):
    return x.new_empty(x.shape[0], w2.shape[1]), x.new_empty(topk_ids.shape[0] * topk_ids.shape[1], w13.shape[1])


@torch.library.custom_op("mojo_triton::fused_moe_backward", mutates_args=("h",))
def fused_moe_backward(grad_out: Tensor, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor,
                       w2: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Overwrites ``h`` (its memory then holds dH), which keeps the peak memory of a step under
    that of the plain grouped-GEMM recipe."""
    return _training.fused_moe_backward(grad_out, x, topk_ids, topk_weights, w13, w2, h)


@fused_moe_backward.register_fake
def _(grad_out, x, topk_ids, topk_weights, w13, w2, h):
    return (torch.empty_like(x), torch.empty_like(topk_weights), torch.empty_like(w13), torch.empty_like(w2))


def _grads(ctx, grad_out, x, topk_ids, topk_weights, w13, w2, h):
    need = ctx.needs_input_grad
    if grad_out is None:
        return None, None, None, None, None
    dx, dw, d13, d2 = fused_moe_backward(grad_out, x, topk_ids, topk_weights, w13, w2, h)
    return (dx if need[0] else None, None, dw if need[2] else None, d13 if need[3] else None,
            d2 if need[4] else None)


def _train_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs, output[1])


def _train_backward(ctx, grad_out, _grad_h):
    if hasattr(ctx, "inputs"):    # a second backward (retain_graph): h was overwritten, recompute it
        inputs = ctx.inputs
        _, h = fused_moe_train(*inputs)
    else:
        *inputs, h = ctx.saved_tensors
        ctx.inputs = inputs
    return _grads(ctx, grad_out, *inputs, h)


torch.library.register_autograd("mojo_triton::fused_moe_train", _train_backward, setup_context=_train_setup_context)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    # a direct call of the inference op saved no activation: recompute h (one more forward)
    saved = ctx.saved_tensors
    _, h = fused_moe_train(*saved)
    return _grads(ctx, grad_out, *saved, h)


torch.library.register_autograd("mojo_triton::fused_moe", _backward, setup_context=_setup_context)


def fused_moe_autograd(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """The routed experts: the inference op, or the training op (which saves ``h``) when a gradient is
    needed."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, topk_weights, w13, w2)):
        return fused_moe_train(x, topk_ids, topk_weights, w13, w2)[0]
    return fused_moe(x, topk_ids, topk_weights, w13, w2)


# ---------------------------------------------------------------- quantized experts (quant_launch.py)
# group_size 0 stands for None (int8 schemes; fp8 blocks are always 128)

@torch.library.custom_op("mojo_triton::quant_moe", mutates_args=())
def quant_moe(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13_q: Tensor, w13_scale: Tensor, w2_q: Tensor,
              w2_scale: Tensor, scheme: str, group_size: int) -> Tensor:
    from . import quant_launch as _quant

    return _quant.quant_fused_moe_forward(x, topk_ids, topk_weights, scheme, w13_q, w13_scale, w2_q, w2_scale,
                                          group_size or None)


@quant_moe.register_fake
def _(x, topk_ids, topk_weights, w13_q, w13_scale, w2_q, w2_scale, scheme, group_size):
    return x.new_empty(x.shape[0], w2_q.shape[1])


@torch.library.custom_op("mojo_triton::quant_experts", mutates_args=())
def quant_experts(permuted_x: Tensor, group_ends: Tensor, w13_q: Tensor, w13_scale: Tensor, w2_q: Tensor,
                  w2_scale: Tensor, scheme: str, group_size: int) -> Tensor:
    from . import quant_launch as _quant

    return _quant.quant_experts_rows(permuted_x, group_ends, scheme, w13_q, w13_scale, w2_q, w2_scale,
                                     group_size or None)


@quant_experts.register_fake
def _(permuted_x, group_ends, w13_q, w13_scale, w2_q, w2_scale, scheme, group_size):
    return permuted_x.new_empty(permuted_x.shape[0], w2_q.shape[1])
