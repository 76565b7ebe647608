"""``quant_moe_forward`` (SPEC §3.6): the MoE forward of SPEC §3.5 with quantized routed experts."""
from __future__ import annotations

import torch

from .forward import routing_kwargs, run_moe


def quant_moe_forward(x, gate_weight, q, top_k, *, gate_bias=None, score_func="softmax", route_norm=False,
                      route_scale=1.0, expert_bias=None, num_expert_groups=1, num_limited_groups=None,
                      group_score="top2_sum", router_dtype=torch.float32, forced_expert_ids=None,
                      activation="swiglu", shared_w13=None, shared_w2=None, shared_gate=None, ep_group=None,
                      ep_mode="allgather", return_router_info=False, backend=None):
    """``moe_forward`` with the routed experts given as a :class:`QuantizedExperts` ``q``.

    Routing, shared experts (float weights), ``forced_expert_ids``, expert parallelism (``q`` holds the
    rank's slice) and router info behave as in :func:`mojo_opset.moe_forward`.  The routed experts
    are the dispatched ``quant_moe_forward`` op, whose reference composes ``moe_permute``,
    ``moe_quant_experts`` and ``moe_combine`` through the dispatcher.  Returns y shaped like x, in x's
    dtype.  Numerics: docs/quantization.md."""
    return run_moe(x, gate_weight, top_k,
                   routing_kwargs(gate_bias, score_func, route_norm, route_scale, expert_bias, num_expert_groups,
                                  num_limited_groups, group_score, router_dtype, forced_expert_ids),
                   experts=q, quantized=True, activation=activation, shared=(shared_w13, shared_w2, shared_gate),
                   ep_group=ep_group, ep_mode=ep_mode, return_router_info=return_router_info, backend=backend)
