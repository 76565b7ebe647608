"""Quantized MoE forward (SPEC §3.6): the MoE forward of SPEC §3.5 with quantized routed experts."""
from __future__ import annotations

import torch

from .. import dispatch as _dispatch
from ..ops.experts import ACTIVATIONS
from ..ops.forward import _routing_kw, run_moe
from ..ops.names import QUANT_MOE_FORWARD
from ..validation import check_choice, fail
from .qexperts import QuantizedExperts
from .reference import quant_experts_reference


def validate_qexperts(x2: torch.Tensor, q, num_experts_local: int, activation: str) -> None:
    check_choice("activation", activation, ACTIVATIONS)
    if not isinstance(q, QuantizedExperts):
        fail(f"q must be a mojo_opset.QuantizedExperts (from quantize_experts or "
             f"QuantizedExperts.from_tensors), got {type(q).__name__}", TypeError)
    if q.device != x2.device:
        fail(f"q is on {q.device} but x is on {x2.device}: move it with q.to(x.device)")
    if q.num_experts != num_experts_local:
        fail(f"q must hold {num_experts_local} experts (the experts of gate_weight, or this rank's slice "
             f"with ep_group), got {q.num_experts}")
    if q.hidden_size != x2.shape[1]:
        fail(f"q's hidden size must equal x.shape[-1] = {x2.shape[1]}, got {q.hidden_size} "
             f"(w13 {list(q.w13_shape)}, w2 {list(q.w2_shape)})")


def quant_moe_forward(x, gate_weight, q, top_k, *, gate_bias=None, score_func="softmax", route_norm=False,
                      route_scale=1.0, expert_bias=None, num_expert_groups=1, num_limited_groups=None,
                      group_score="top2_sum", router_dtype=torch.float32, forced_expert_ids=None,
                      activation="swiglu", shared_w13=None, shared_w2=None, shared_gate=None, ep_group=None,
                      ep_mode="allgather", return_router_info=False, backend=None):
    """``moe_forward`` with the routed experts given as a :class:`QuantizedExperts` ``q``.

    Routing, shared experts (float weights), ``forced_expert_ids``, expert parallelism (``q`` holds the
    rank's slice) and router info behave as in :func:`mojo_opset.moe_forward`.  Returns y shaped like x,
    in x's dtype.  Numerics: docs/quantization.md."""
    def check_experts(x2, e_local):
        validate_qexperts(x2, q, e_local, activation)
        return ()           # codes and scales carry no gradient

    def experts_fn(xs, ids, weights, expert_offset):
        # with EP: the rank's pairs as rows of K=1, ids relative to its slice, weights 1
        call = dict(x=xs, topk_ids=ids, topk_weights=weights, qexperts=q, activation=activation)
        y, _ = _dispatch.dispatch(QUANT_MOE_FORWARD, quant_experts_reference, call, device=xs.device,
                                  backend=backend)
        return y

    return run_moe(x, gate_weight, top_k,
                   _routing_kw(gate_bias, score_func, route_norm, route_scale, expert_bias, num_expert_groups,
                               num_limited_groups, group_score, router_dtype, forced_expert_ids),
                   experts_fn=experts_fn, ep_group=ep_group, ep_mode=ep_mode,
                   shared=(shared_w13, shared_w2, shared_gate), return_router_info=return_router_info,
                   backend=backend, check_experts=check_experts)
