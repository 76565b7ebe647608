"""``moe_forward`` (SPEC §3.5): gating -> permute -> experts -> combine (+ shared experts).

The data flow, top-down: :func:`run_moe` validates once, routes (:func:`~.gating.route`), runs the
routed experts locally (:func:`routed_experts`, the dispatched ``moe_forward`` op, whose reference
:func:`compose_forward` dispatches permute, experts and combine one by one) or across an expert-
parallel group, adds the shared experts and returns the router info when asked.  Quantized experts
(:mod:`.quant_forward`) take the same path with ``quant_moe_forward`` / ``moe_quant_experts``.
"""
from __future__ import annotations

import functools
import operator

import torch

from ..contract.calls import (CombineCall, ExpertsCall, ForwardCall, PermuteCall, QuantExpertsCall,
                              QuantForwardCall)
from ..contract.names import MOE_EXPERTS, MOE_QUANT_EXPERTS
from ..dispatch import dispatch
from ..modes import is_deterministic, resolve
from ..quant.qexperts import QuantizedExperts
from ..reference.shared import shared_experts
from ..validation import check_choice
from .checks import validate_experts, validate_qexperts, validate_shared
from .combine import combine
from . import inference_op
from .eager_graphs import cached_forward
from .experts import experts, experts_alignment, quant_experts
from .gating import route
from .permute import permute
from .routing import ROUTING_SCALARS, normalize_routing

EP_MODES = ("allgather", "alltoall")


def compose_forward(call: ForwardCall | QuantForwardCall, backend=None):
    """The reference of the routed-experts ops: permute -> (quantized) experts -> combine, each
    dispatched on its own, so a backend's permute or combine kernel serves it."""
    quant = isinstance(call, QuantForwardCall)
    E = call.qexperts.num_experts if quant else call.w13.shape[0]
    align = experts_alignment(call.device.type, MOE_QUANT_EXPERTS if quant else MOE_EXPERTS, backend)
    det = call.deterministic
    px, _counts, ends, _row_src, pair_row = permute(PermuteCall(call.x, call.topk_ids, E, align), backend)
    if quant:
        y = quant_experts(QuantExpertsCall(px, ends, call.qexperts, call.activation, det), backend)
    else:
        y = experts(ExpertsCall(px, ends, call.w13, call.w2, call.activation, det), backend)
    return combine(CombineCall(y, pair_row, call.topk_weights, call.x.shape[0], det), backend)


def routed_experts(x2, ids, weights, experts, activation="swiglu", backend=None, expert_offset=0,
                   deterministic=None):
    """The routed experts of already-routed tokens (no shared experts, no EP): the dispatched
    ``moe_forward`` op for float weights ``experts = (w13, w2)``, ``quant_moe_forward`` for a
    :class:`QuantizedExperts`.  ``expert_offset`` is unused (EP hands local ids); ``deterministic``:
    None reads the calling context's mode."""
    det = resolve(deterministic)
    if isinstance(experts, QuantizedExperts):
        call = QuantForwardCall(x=x2, topk_ids=ids, topk_weights=weights, qexperts=experts, activation=activation,
                                deterministic=det)
    else:
        w13, w2 = experts
        call = ForwardCall(x=x2, topk_ids=ids, topk_weights=weights, w13=w13, w2=w2, activation=activation,
                           deterministic=det)
    return dispatch(call, functools.partial(compose_forward, backend=backend), backend=backend)[0]


def router_info(ids, weights, scores, logits, E):
    flat = ids.reshape(-1).long()
    tpe = torch.zeros(E, dtype=torch.int64, device=ids.device).index_add_(0, flat, torch.ones_like(flat))
    return {"scores": scores, "topk_ids": ids, "topk_weights": weights, "logits": logits,
            "tokens_per_expert": tpe.to(torch.int32)}


def _validate_experts(x2, experts, quantized: bool, num_local: int, activation: str) -> tuple:
    """Validates the routed experts; returns the tensors that may require grad."""
    if quantized:
        validate_qexperts(x2, experts, num_local, activation)
        return ()                   # codes and scales carry no gradient
    validate_experts(x2, *experts, num_local, activation)
    return experts


def run_moe(x, gate_weight, top_k, routing_kw, *, experts, quantized, activation, shared, ep_group, ep_mode,
            return_router_info, backend):
    """The MoE forward of float (``experts = (w13, w2)``) or quantized (``quantized=True``, a
    :class:`QuantizedExperts`) experts; a repeated eager call of a few tokens is replayed from a
    CUDA graph (:mod:`.eager_graphs`), a compiled inference call is one opaque op (:mod:`.inference_op`)."""
    def run(inp):
        return _run_moe(inp, gate_weight, top_k, routing_kw, experts=experts, quantized=quantized,
                        activation=activation, shared=shared, ep_group=ep_group, ep_mode=ep_mode,
                        return_router_info=return_router_info, backend=backend)

    if ep_group is not None or routing_kw["forced_expert_ids"] is not None or not isinstance(x, torch.Tensor):
        return run(x)
    if quantized:
        if not isinstance(experts, QuantizedExperts):
            return run(x)           # the validation names the bad argument
        q = experts
        weights = (q.w13_q, q.w13_scale, q.w2_q, q.w2_scale, q.w13_smooth, q.w2_smooth)
        kind = (q.scheme, q.group_size)
    else:
        weights, kind = tuple(experts), None
    tensors = (gate_weight, routing_kw["gate_bias"], routing_kw["expert_bias"], *shared, *weights)
    if torch.compiler.is_compiling():
        if all(t is None or isinstance(t, torch.Tensor) for t in tensors) and inference_op.wanted(x, tensors, backend):
            return inference_op.call(x, tensors, top_k, routing_kw, kind, activation, return_router_info, backend)
        return run(x)
    scalars = (top_k, _routing_scalars(routing_kw), kind, activation, return_router_info, backend)
    return cached_forward(x, tensors, scalars, run, _token_bytes(x, weights[0], top_k))   # it checks `tensors`


def _token_bytes(x, w13, top_k) -> int:
    """Activation bytes per token of the fused forward: each pair's intermediate row (I) and output
    row (H) in x's dtype, plus x itself (an estimate for the eager graphs' memory budget)."""
    if (not isinstance(x, torch.Tensor) or not isinstance(w13, torch.Tensor) or not isinstance(top_k, int)
            or x.dim() == 0 or w13.dim() < 2):
        return 1 << 62              # the validation names the bad argument
    h, size = x.shape[-1], x.element_size()
    return (top_k * (w13.shape[-2] // 2 + h) + h) * size


_routing_scalars = operator.itemgetter(*ROUTING_SCALARS)


inference_op.bind(run_moe)


def _run_moe(x, gate_weight, top_k, routing_kw, *, experts, quantized, activation, shared, ep_group, ep_mode,
             return_router_info, backend):
    """With ``ep_group`` the validation runs inside the ranks' agreement, so a rank's bad argument is
    an error on every rank rather than a hang."""
    def validate():
        check_choice("ep_mode", ep_mode, EP_MODES)
        x2, routing = normalize_routing(x, gate_weight, top_k, **routing_kw)
        validate_shared(x2, *shared)
        num_local = gate_weight.shape[0]
        if ep_group is not None:
            from ..distributed import local_expert_range
            lo, hi = local_expert_range(num_local, ep_group)
            num_local = hi - lo
        params = _validate_experts(x2, experts, quantized, num_local, activation)
        return x2, routing, gate_weight, (x2, gate_weight, routing_kw["gate_bias"], *shared, *params)

    if ep_group is None:
        x2, routing, _, _ = validate()
    else:
        from ..distributed import agree
        x2, routing, ep_call = agree(ep_group, ep_mode, validate, x)

    det = is_deterministic()
    ids, weights, scores, logits = route(x2, gate_weight, routing_kw["gate_bias"], routing_kw["router_dtype"],
                                         routing, backend, det)
    run_local = functools.partial(_local_experts, experts=experts, activation=activation, backend=backend,
                                  deterministic=det)
    if ep_group is None:
        y = run_local(x2, ids, weights, 0)
    else:
        from ..distributed import ep_forward
        y = ep_forward(ep_call, x2, ids, weights, run_local)
    if shared[0] is not None:
        y = y + shared_experts(x2, *shared, deterministic=det)
    y = y.reshape(x.shape)
    if return_router_info:
        return y, router_info(ids, weights, scores, logits, gate_weight.shape[0])
    return y


def _local_experts(rows, ids, weights, expert_offset, *, experts, activation, backend, deterministic):
    return routed_experts(rows, ids, weights, experts, activation, backend, deterministic=deterministic)


def routing_kwargs(gate_bias, score_func, route_norm, route_scale, expert_bias, num_expert_groups,
                   num_limited_groups, group_score, router_dtype, forced_expert_ids):
    return dict(gate_bias=gate_bias, score_func=score_func, route_norm=route_norm, route_scale=route_scale,
                expert_bias=expert_bias, num_expert_groups=num_expert_groups,
                num_limited_groups=num_limited_groups, group_score=group_score, router_dtype=router_dtype,
                forced_expert_ids=forced_expert_ids)


def moe_forward(x, gate_weight, w13, w2, top_k, *, gate_bias=None, score_func="softmax", route_norm=False,
                route_scale=1.0, expert_bias=None, num_expert_groups=1, num_limited_groups=None,
                group_score="top2_sum", router_dtype=torch.float32, forced_expert_ids=None,
                activation="swiglu", shared_w13=None, shared_w2=None, shared_gate=None, ep_group=None,
                ep_mode="allgather", return_router_info=False, backend=None):
    """``combine(experts(permute(x, gating(x)))) + shared(x)``; see docs/ops.md.

    x: ``[..., H]``; w13 ``[E_local, 2I, H]``; w2 ``[E_local, H, I]`` (E_local = E without EP, the
    rank's expert slice with ``ep_group``).  Returns y shaped like x (and router info if asked)."""
    return run_moe(x, gate_weight, top_k,
                   routing_kwargs(gate_bias, score_func, route_norm, route_scale, expert_bias, num_expert_groups,
                                  num_limited_groups, group_score, router_dtype, forced_expert_ids),
                   experts=(w13, w2), quantized=False, activation=activation, shared=(shared_w13, shared_w2, shared_gate),
                   ep_group=ep_group, ep_mode=ep_mode, return_router_info=return_router_info, backend=backend)
