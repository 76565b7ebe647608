"""How ``mojo-opset compare`` calls each op on a backend and checks it against the reference.

Every call goes through the public dispatch path with an explicit backend (``backend="torch"`` is
the reference), so what is compared is exactly what a user of that backend gets, fallbacks included.
``call(inputs, backend)`` returns the op's outputs; ``check(got, ref, inputs, case)`` returns the
per-output comparisons and notes.
"""
from __future__ import annotations

import torch

import mojo_opset as mo
from mojo_opset import registry
from mojo_opset.contract.names import MOE_COMBINE, MOE_EXPERTS, MOE_FORWARD, MOE_GATING, MOE_PERMUTE, QUANT_MOE_FORWARD
from mojo_opset.reference.gating import weights_from_ids
from mojo_opset.testing.accuracy import (EXACT, compare_tensors, gemm_tolerance, quant_tolerance,
                                         routing_tolerance)
from mojo_opset.testing.routing import compare_routing

REFERENCE = "torch"


def quant_supported() -> bool:
    return hasattr(mo, "quantize_experts") and hasattr(mo, "quant_moe_forward")


def logits_dtype(inp: dict) -> torch.dtype:
    rd = inp["routing"].get("router_dtype", torch.float32)
    return inp["x"].dtype if rd is None else rd


def experts_align_for(backend: str) -> int:
    """The row alignment the backend's experts kernel asks permute for (1 for the reference).

    Read from the implementation itself: probing ``reasons()`` with placeholder arguments could
    cache a bogus decision for real calls."""
    if backend == REFERENCE:
        return 1
    entry = registry.get_entry(backend)
    try:
        impl = entry.impls().get(MOE_EXPERTS) if entry is not None else None
    except Exception:
        return 1
    return int(impl.required_alignment or 1) if impl is not None else 1


# --------------------------------------------------------------------------- calls

def _call_gating(inp, backend):
    return mo.moe_gating(inp["x"], inp["gate_weight"], inp["top_k"], return_scores=True, backend=backend,
                         **inp["routing"])


def _call_permute(inp, backend):
    return mo.moe_permute(inp["x"], inp["topk_ids"], inp["num_experts"], align=inp["align"], backend=backend)


def _call_experts(inp, backend):
    return mo.moe_experts(inp["permuted_x"], inp["group_ends"], inp["w13"], inp["w2"], backend=backend)


def _call_combine(inp, backend):
    return mo.moe_combine(inp["expert_out"], inp["pair_row"], inp["topk_weights"], backend=backend)


def _shared_kw(inp):
    return {k: inp[k] for k in ("shared_w13", "shared_w2", "shared_gate") if k in inp}


def _call_forward(inp, backend, routing=None):
    return mo.moe_forward(inp["x"], inp["gate_weight"], inp["w13"], inp["w2"], inp["top_k"],
                          return_router_info=True, backend=backend, **_shared_kw(inp),
                          **(routing if routing is not None else inp["routing"]))


def _quantized(inp):
    if "q" not in inp:
        o = inp["case_options"]
        inp["q"] = mo.quantize_experts(inp["w13"], inp["w2"], o["scheme"], group_size=o.get("group_size"))
    return inp["q"]


def _call_quant(inp, backend, routing=None):
    return mo.quant_moe_forward(inp["x"], inp["gate_weight"], _quantized(inp), inp["top_k"],
                                return_router_info=True, backend=backend, **_shared_kw(inp),
                                **(routing if routing is not None else inp["routing"]))


# --------------------------------------------------------------------------- checks

def _routing_args(inp):
    r = inp["routing"]
    return dict(expert_bias=r.get("expert_bias"), num_expert_groups=r.get("num_expert_groups", 1),
                num_limited_groups=r.get("num_limited_groups"), group_score=r.get("group_score", "top2_sum"),
                logits_dtype=logits_dtype(inp), forced=r.get("forced_expert_ids") is not None)


def _tie_note(accepted: int) -> list[str]:
    return [f"topk_ids: {accepted} row(s) differ only at near-ties (accepted)"] if accepted else []


def _check_gating(got, ref, inp, case):
    ids, w, sc = got
    rids, rw, rsc = ref
    d_ids, accepted = compare_routing(ids, rids, rsc, **_routing_args(inp))
    tol = routing_tolerance(logits_dtype(inp))
    diffs = [d_ids]
    if isinstance(ids, torch.Tensor) and tuple(ids.shape) == tuple(rids.shape):
        r = inp["routing"]
        safe = ids.to(rsc.device).long().clamp(0, max(rsc.shape[1] - 1, 0))
        want_w = weights_from_ids(rsc, safe, r.get("route_norm", False), float(r.get("route_scale", 1.0)))
        diffs.append(compare_tensors("topk_weights", w, want_w, tol))
    diffs.append(compare_tensors("scores", sc, rsc, tol))
    return diffs, _tie_note(accepted), tol


def _check_exact(names):
    def check(got, ref, inp, case):
        if not isinstance(got, (tuple, list)) or len(got) != len(names):
            raise TypeError(f"expected a tuple of {len(names)} outputs ({', '.join(names)}), got {type(got).__name__}")
        return [compare_tensors(n, g, r, EXACT) for n, g, r in zip(names, got, ref)], [], EXACT
    return check


def _check_gemm(name):
    def check(got, ref, inp, case):
        tol = gemm_tolerance(case.dtype)
        return [compare_tensors(name, got, ref, tol)], [], tol
    return check


def _check_moe(caller, tol_fn):
    def check(got, ref, inp, case):
        y, info = got
        ry, rinfo = ref
        d_ids, accepted = compare_routing(info["topk_ids"], rinfo["topk_ids"], rinfo["scores"], **_routing_args(inp))
        notes = _tie_note(accepted)
        if d_ids.ok and accepted:
            # replay the backend's (equally valid) routing through the reference for the output check
            routing = dict(inp["routing"], forced_expert_ids=info["topk_ids"])
            ry, _ = caller(inp, REFERENCE, routing)
            notes.append("y: compared with the reference replaying the backend's routing")
        tol = tol_fn(case)
        return [d_ids, compare_tensors("y", y, ry, tol)], notes, tol
    return check


OPS = {
    MOE_GATING: (_call_gating, _check_gating),
    MOE_PERMUTE: (_call_permute, _check_exact(("permuted_x", "tokens_per_expert", "group_ends", "row_src",
                                               "pair_row"))),
    MOE_EXPERTS: (_call_experts, _check_gemm("y")),
    MOE_COMBINE: (_call_combine, _check_gemm("out")),
    MOE_FORWARD: (_call_forward, _check_moe(_call_forward, lambda c: gemm_tolerance(c.dtype))),
    QUANT_MOE_FORWARD: (_call_quant, _check_moe(_call_quant,
                                                lambda c: quant_tolerance(c.options["scheme"], c.dtype))),
}
