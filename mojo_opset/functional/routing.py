"""Validation of the routing arguments (SPEC §3.1, §6) into a :class:`RoutingOptions`."""
from __future__ import annotations

import math
import numbers

import torch

from ..contract.calls import RoutingOptions
from ..reference.gating import GROUP_SCORES, SCORE_FUNCS
from ..validation import FLOAT_DTYPES, check_choice, check_int, check_tensor, fail


# the routing keywords of moe_forward that are not tensors (gate_bias, expert_bias, forced ids are)
ROUTING_SCALARS = ("score_func", "route_norm", "route_scale", "num_expert_groups", "num_limited_groups",
                   "group_score", "router_dtype")


def validate_forced_ids(forced, T: int, top_k: int, E: int, device) -> tuple[torch.Tensor, bool]:
    """Checks ``forced_expert_ids`` (shape, integer dtype, values in [0, E) or -1, no repeated id in
    a row) and moves it to x's device as int64.  Returns ``(ids, partial)``: partial is whether a -1
    (a slot keeping the natural choice) may be present."""
    check_tensor("forced_expert_ids", forced, ndim=2)
    if forced.dtype.is_floating_point or forced.dtype.is_complex or forced.dtype == torch.bool:
        fail(f"forced_expert_ids must have an integer dtype, got {str(forced.dtype).replace('torch.', '')}", TypeError)
    if tuple(forced.shape) != (T, top_k):
        fail(f"forced_expert_ids must have shape [T, top_k] = [{T}, {top_k}], got {list(forced.shape)}")
    dev = torch.device(device)
    if forced.device.type == "meta" and dev.type != "meta":
        fail(f"forced_expert_ids is on the meta device (no values) but x is on {dev}: pass the ids "
             f"on {dev}" + ("" if dev.type == "cpu" else " or on the CPU"))
    forced = forced.to(device=dev, dtype=torch.int64)
    if dev.type == "meta" or not forced.numel():
        return forced, dev.type == "meta"  # no values to check
    bad = (forced < -1) | (forced >= E)
    free = forced < 0
    dup = None
    if top_k > 1:
        # -1 slots may repeat: give each a distinct negative key before looking for duplicates
        keyed = torch.where(free, -2 - torch.arange(top_k, device=dev), forced)
        s = keyed.sort(dim=1).values
        dup = (s[:, 1:] == s[:, :-1]).any(dim=1)
    if torch.compiler.is_compiling():
        # a graph cannot branch on values: assert on the device, and let the partial path handle any -1
        torch._assert_async(~bad.any(), f"forced_expert_ids must lie in [0, {E}) or be -1")
        if dup is not None:
            torch._assert_async(~dup.any(), "forced_expert_ids must not repeat an expert within a row")
        return forced, True
    # eager: one host read at validation time (replay is not the decode hot path); errors must be clear
    flags = torch.stack([bad.any(), free.any(), dup.any() if dup is not None else bad.new_zeros(())]).tolist()
    if flags[0]:
        r = int(bad.any(dim=1).nonzero()[0, 0])
        fail(f"forced_expert_ids must lie in [0, {E}) or be -1 (keep the natural choice); row {r} is "
             f"{forced[r].tolist()}")
    if flags[2]:
        r = int(dup.nonzero()[0, 0])
        fail(f"forced_expert_ids must not repeat an expert within a row; row {r} is {forced[r].tolist()}")
    return forced, bool(flags[1])


def normalize_routing(x, gate_weight, top_k, *, gate_bias=None, score_func="softmax", route_norm=False,
                      route_scale=1.0, expert_bias=None, num_expert_groups=1, num_limited_groups=None,
                      group_score="top2_sum", router_dtype=torch.float32, forced_expert_ids=None):
    """Validate the routing arguments; returns ``(x2d [T, H], RoutingOptions)``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        fail(f"x must have shape [..., H], got {list(x.shape)}")
    H = x.shape[-1]
    if H < 1:
        fail(f"x must have a non-empty last dimension H, got shape {list(x.shape)}")
    x2 = x.reshape(-1, H)
    dev = x.device
    check_tensor("gate_weight", gate_weight, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    E = gate_weight.shape[0]
    if gate_weight.shape[1] != H:
        fail(f"gate_weight must have shape [E, H] with H = x.shape[-1] = {H}, got {list(gate_weight.shape)}")
    if E < 1:
        fail("gate_weight must have at least one expert row (E >= 1)")
    top_k = check_int("top_k", top_k)
    if top_k <= 0 or top_k > E:
        fail(f"top_k must satisfy 0 < top_k <= E = {E}, got {top_k}")
    if gate_bias is not None:
        check_tensor("gate_bias", gate_bias, dtypes=FLOAT_DTYPES, device=dev, shape=(E,))
    check_choice("score_func", score_func, SCORE_FUNCS)
    check_choice("group_score", group_score, GROUP_SCORES)
    if not isinstance(route_norm, bool):
        fail(f"route_norm must be a bool, got {type(route_norm).__name__}", TypeError)
    if not isinstance(route_scale, numbers.Real) or isinstance(route_scale, bool):
        fail(f"route_scale must be a float, got {type(route_scale).__name__}", TypeError)
    route_scale = float(route_scale)
    if not math.isfinite(route_scale):
        fail(f"route_scale must be a finite number, got {route_scale}")
    if expert_bias is not None:
        check_tensor("expert_bias", expert_bias, dtypes=FLOAT_DTYPES, device=dev, shape=(E,))
        expert_bias = expert_bias.float()
    G = check_int("num_expert_groups", num_expert_groups, lo=1)
    if E % G:
        fail(f"num_expert_groups must divide E = {E}, got {G}")
    L = G if num_limited_groups is None else check_int("num_limited_groups", num_limited_groups, lo=1, hi=G)
    if L * (E // G) < top_k:
        fail(f"num_limited_groups x experts per group must be >= top_k: {L} x {E // G} < {top_k}")
    if L == G:
        G = L = 1          # keeping every group is no group limit
    if router_dtype is not None and router_dtype not in FLOAT_DTYPES:
        fail(f"router_dtype must be torch.float32, torch.bfloat16, torch.float16 or None, got {router_dtype}", TypeError)
    partial = False
    if forced_expert_ids is not None:
        forced_expert_ids, partial = validate_forced_ids(forced_expert_ids, x2.shape[0], top_k, E, dev)
    opts = RoutingOptions(top_k=top_k, score_func=score_func, route_norm=route_norm, route_scale=route_scale,
                          expert_bias=expert_bias, num_expert_groups=G, num_limited_groups=L,
                          group_score=group_score, forced_expert_ids=forced_expert_ids, partial_replay=partial)
    return x2, opts


def routing_kwargs(opts: RoutingOptions) -> dict:
    """The options as the keyword arguments of :func:`mojo_opset.reference.gating.gating_reference`."""
    return dict(top_k=opts.top_k, score_func=opts.score_func, route_norm=opts.route_norm,
                route_scale=opts.route_scale, expert_bias=opts.expert_bias,
                num_expert_groups=opts.num_expert_groups, num_limited_groups=opts.num_limited_groups,
                group_score=opts.group_score, forced_expert_ids=opts.forced_expert_ids,
                partial_replay=opts.partial_replay)
