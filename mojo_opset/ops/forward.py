"""MoE forward (SPEC §3.5): gating -> permute -> experts -> combine (+ shared experts)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch as _dispatch
from ..validation import FLOAT_DTYPES, check_choice, check_tensor, fail
from .combine import combine_reference
from .experts import ACTIVATIONS, experts_reference
from .gating import normalize_routing, route
from .names import MOE_COMBINE, MOE_EXPERTS, MOE_FORWARD, MOE_PERMUTE
from .permute import permute_reference

EP_MODES = ("allgather", "alltoall")


def impl_alignment(impl) -> int:
    """The row alignment an experts OpImpl declares (``required_alignment``; 1 when absent)."""
    return int(getattr(impl, "required_alignment", 1) or 1) if impl is not None else 1


def experts_alignment(device_type: str, backend=None) -> int:
    """The row alignment the selected experts implementation needs from permute (1 for the reference).

    Read from the implementation itself, not from its per-call answer: padded groups are valid input
    for every implementation, so if it later declines the call the reference serves the same rows."""
    name = _dispatch.select_backend(MOE_EXPERTS, device_type, backend)
    return impl_alignment(_dispatch.implementation(name, MOE_EXPERTS))


def compose_forward(x, topk_ids, topk_weights, w13, w2, activation="swiglu", *, backend=None):
    """The reference MoE forward, built from the (individually dispatched) sub-ops."""
    T, E = x.shape[0], w13.shape[0]
    dev = x.device
    align = experts_alignment(dev.type, backend)
    (px, _counts, ends, _row_src, pair_row), _ = _dispatch.dispatch(
        MOE_PERMUTE, permute_reference, dict(x=x, topk_ids=topk_ids, num_experts=E, align=align),
        device=dev, backend=backend)
    y, _ = _dispatch.dispatch(
        MOE_EXPERTS, experts_reference,
        dict(permuted_x=px, group_ends=ends, w13=w13, w2=w2, activation=activation),
        device=dev, backend=backend)
    out, _ = _dispatch.dispatch(
        MOE_COMBINE, combine_reference,
        dict(expert_out=y, pair_row=pair_row, topk_weights=topk_weights, num_tokens=T),
        device=dev, backend=backend)
    return out


def shared_experts(x, shared_w13, shared_w2, shared_gate=None):
    """SwiGLU MLP ``[2*I_s, H]`` / ``[H, I_s]``, optionally scaled by ``sigmoid(x @ shared_gate.T)``."""
    shared_w13, shared_w2 = shared_w13.to(x.dtype), shared_w2.to(x.dtype)  # as the routed experts do
    a = (F.silu(F.linear(x, shared_w13[: shared_w13.shape[0] // 2]).float())
         * F.linear(x, shared_w13[shared_w13.shape[0] // 2:]).float()).to(x.dtype)
    y = F.linear(a, shared_w2)
    if shared_gate is not None:
        y = (y.float() * torch.sigmoid(F.linear(x.float(), shared_gate.float()))).to(x.dtype)
    return y


def validate_experts(x2, w13, w2, num_experts_local, activation, name13="w13", name2="w2"):
    H = x2.shape[1]
    check_choice("activation", activation, ACTIVATIONS)
    check_tensor(name13, w13, ndim=3, dtypes=FLOAT_DTYPES, device=x2.device)
    check_tensor(name2, w2, ndim=3, dtypes=FLOAT_DTYPES, device=x2.device)
    E, N, Hw = w13.shape
    if E != num_experts_local:
        fail(f"{name13} must have {num_experts_local} experts (dim 0), got shape {list(w13.shape)}")
    if Hw != H or N % 2:
        fail(f"{name13} must have shape [E, 2*I, H] with H = {H}, got {list(w13.shape)}")
    if tuple(w2.shape) != (E, H, N // 2):
        fail(f"{name2} must have shape [E, H, I] = [{E}, {H}, {N // 2}], got {list(w2.shape)}")


def validate_shared(x2, shared_w13, shared_w2, shared_gate):
    if (shared_w13 is None) != (shared_w2 is None):
        fail("shared_w13 and shared_w2 must be given together")
    if shared_gate is not None and shared_w13 is None:
        fail("shared_gate needs shared_w13 and shared_w2")
    if shared_w13 is None:
        return
    H = x2.shape[1]
    check_tensor("shared_w13", shared_w13, ndim=2, dtypes=FLOAT_DTYPES, device=x2.device)
    n = shared_w13.shape[0]
    if n % 2 or shared_w13.shape[1] != H:
        fail(f"shared_w13 must have shape [2*I_s, H] with H = {H}, got {list(shared_w13.shape)}")
    check_tensor("shared_w2", shared_w2, dtypes=FLOAT_DTYPES, device=x2.device, shape=(H, n // 2))
    if shared_gate is not None:
        check_tensor("shared_gate", shared_gate, dtypes=FLOAT_DTYPES, device=x2.device, shape=(1, H))


def _router_info(ids, weights, scores, E):
    flat = ids.reshape(-1).long()
    tpe = torch.zeros(E, dtype=torch.int64, device=ids.device).index_add_(0, flat, torch.ones_like(flat))
    return {"scores": scores, "topk_ids": ids, "topk_weights": weights,
            "tokens_per_expert": tpe.to(torch.int32)}


def run_moe(x, gate_weight, top_k, routing_kw, *, experts_fn, ep_group, ep_mode, shared, return_router_info,
            backend, check_experts=None):
    """Shared driver of moe_forward and quant_moe_forward: routing, experts (local or EP), shared, info.

    ``check_experts(x2, num_local_experts)`` validates the expert tensors (raising) and returns those
    that may require grad; with ``ep_group`` it runs inside the ranks' agreement, so a rank's bad
    argument is an error on every rank rather than a hang.  ``experts_fn(rows, ids, weights,
    expert_offset)`` computes the local experts (ids in ``[0, E_local)``; EP passes rows of K=1)."""
    def validate():
        check_choice("ep_mode", ep_mode, EP_MODES)
        x2, opts = normalize_routing(x, gate_weight, top_k, **routing_kw)
        validate_shared(x2, *shared)
        e_local = gate_weight.shape[0]
        if ep_group is not None:
            from ..distributed import local_expert_range
            lo, hi = local_expert_range(e_local, ep_group)
            e_local = hi - lo
        params = tuple(check_experts(x2, e_local) or ()) if check_experts is not None else ()
        return x2, opts, gate_weight, (x2, gate_weight, routing_kw.get("gate_bias"), *shared, *params)

    if ep_group is None:
        x2, opts, _, _ = validate()
    else:
        from ..distributed import agree
        x2, opts, ep_call = agree(ep_group, ep_mode, validate, x)
    E = gate_weight.shape[0]
    ids, weights, scores = route(x2, gate_weight, routing_kw.get("gate_bias"),
                                 routing_kw.get("router_dtype", torch.float32), opts, backend)
    if ep_group is not None:
        from ..distributed import ep_forward
        y = ep_forward(ep_call, x2, ids, weights, experts_fn)
    else:
        y = experts_fn(x2, ids, weights, 0)
    if shared[0] is not None:
        y = y + shared_experts(x2, *shared)
    y = y.reshape(x.shape)
    if return_router_info:
        return y, _router_info(ids, weights, scores, E)
    return y


def _routing_kw(gate_bias, score_func, route_norm, route_scale, expert_bias, num_expert_groups,
                num_limited_groups, group_score, router_dtype, forced_expert_ids):
    return dict(gate_bias=gate_bias, score_func=score_func, route_norm=route_norm, route_scale=route_scale,
                expert_bias=expert_bias, num_expert_groups=num_expert_groups,
                num_limited_groups=num_limited_groups, group_score=group_score, router_dtype=router_dtype,
                forced_expert_ids=forced_expert_ids)


def routed_experts(x2, ids, weights, w13, w2, activation, backend):
    """The dispatched MOE_FORWARD op on already-routed tokens (no shared experts, no EP)."""
    call = dict(x=x2, topk_ids=ids, topk_weights=weights, w13=w13, w2=w2, activation=activation)
    ref = lambda **c: compose_forward(**c, backend=backend)  # noqa: E731
    y, _ = _dispatch.dispatch(MOE_FORWARD, ref, call, device=x2.device, backend=backend)
    return y


def moe_forward(x, gate_weight, w13, w2, top_k, *, gate_bias=None, score_func="softmax", route_norm=False,
                route_scale=1.0, expert_bias=None, num_expert_groups=1, num_limited_groups=None,
                group_score="top2_sum", router_dtype=torch.float32, forced_expert_ids=None,
                activation="swiglu", shared_w13=None, shared_w2=None, shared_gate=None, ep_group=None,
                ep_mode="allgather", return_router_info=False, backend=None):
    """``combine(experts(permute(x, gating(x)))) + shared(x)``; see docs/ops.md.

    x: ``[..., H]``; w13 ``[E_local, 2I, H]``; w2 ``[E_local, H, I]`` (E_local = E without EP, the
    rank's expert slice with ``ep_group``).  Returns y shaped like x (and router info if asked)."""
    def check_experts(x2, e_local):
        validate_experts(x2, w13, w2, e_local, activation)
        return w13, w2

    def experts_fn(xs, ids, weights, expert_offset):
        # with EP: the rank's pairs as rows of K=1, ids relative to its slice, weights 1
        return routed_experts(xs, ids, weights, w13, w2, activation, backend)

    return run_moe(x, gate_weight, top_k,
                   _routing_kw(gate_bias, score_func, route_norm, route_scale, expert_bias, num_expert_groups,
                               num_limited_groups, group_score, router_dtype, forced_expert_ids),
                   experts_fn=experts_fn, ep_group=ep_group, ep_mode=ep_mode,
                   shared=(shared_w13, shared_w2, shared_gate), return_router_info=return_router_info,
                   backend=backend, check_experts=check_experts)
