"""Deterministic inputs for one compare case, generated directly on the target device.

Scales keep every output of order one (logits ~ N(0, 1), expert GEMM outputs ~ N(0, 1)), so the
absolute parts of the tolerances mean the same thing in every case.

Options: ``score_func route_norm route_scale num_expert_groups num_limited_groups group_score`` as in
``mo.moe_gating``; ``gate_bias``/``expert_bias`` (bool) add random biases; ``forced`` replays random
distinct ids; ``router_dtype="input"`` means ``router_dtype=None``; ``shared``/``shared_gate`` add
shared experts; ``align`` (permute/combine); ``scheme``/``group_size`` (quantized); ``edge`` is one of
``one_expert`` (every token's first choice is expert 3), ``near_ties`` (bit-identical and nearly
identical router rows), ``nan_row`` (a NaN token).
"""
from __future__ import annotations

import math

import torch

from mojo_opset.reference.permute import permute_reference

from .compare_cases import Case

ROUTING_KEYS = ("score_func", "route_norm", "route_scale", "num_expert_groups", "num_limited_groups", "group_score")
ONE_EXPERT = 3


class _Rand:
    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.g = torch.Generator(device=device)
        self.g.manual_seed(1234 + seed)

    def normal(self, shape, std=1.0, dtype=torch.float32):
        t = torch.empty(shape, dtype=dtype, device=self.device)
        return t.normal_(0.0, std, generator=self.g)

    def uniform(self, shape):
        return torch.rand(shape, generator=self.g, device=self.device)

    def distinct_ids(self, T, E, K):
        """Random ids, distinct within each row (a random permutation's first K)."""
        return self.uniform((T, E)).argsort(dim=1)[:, :K].to(torch.int32)


def routing_kwargs(case: Case, r: _Rand) -> dict:
    """Keyword arguments of mo.moe_gating / mo.moe_forward for this case (tensors included)."""
    o, E = case.options, case.shape["E"]
    kw = {k: o[k] for k in ROUTING_KEYS if k in o}
    if o.get("gate_bias") or o.get("edge") == "one_expert":
        gb = r.normal((E,), 0.5, case.dtype)
        if o.get("edge") == "one_expert":
            gb.zero_()
            gb[ONE_EXPERT] = 30.0
        kw["gate_bias"] = gb
    if o.get("expert_bias"):
        kw["expert_bias"] = r.normal((E,), 0.1)
    if o.get("router_dtype") == "input":
        kw["router_dtype"] = None
    return kw


def _gate_weight(case: Case, r: _Rand, kw: dict) -> torch.Tensor:
    E, H = case.shape["E"], case.shape["H"]
    w = r.normal((E, H), 1.0 / math.sqrt(H))
    if case.options.get("edge") == "near_ties":
        w[:4] *= 2.0                                    # make the tied experts frequent winners
        w[1] = w[0]                                     # bit-identical logits: lower id must win
        w[3] = w[2] * (1 + 1e-6)                        # a genuine near-tie
        G = case.options.get("num_expert_groups", 1)
        if G > 1 and E // G <= 4 and E >= 2 * (E // G):
            per = E // G
            w[per:2 * per] = w[:per]                    # two groups with equal scores: lower group wins
            if "expert_bias" in kw:
                kw["expert_bias"][per:2 * per] = kw["expert_bias"][:per]
    return w.to(case.dtype)


def _experts(case: Case, r: _Rand):
    E, H, I = case.shape["E"], case.shape["H"], case.shape["I"]
    w13 = r.normal((E, 2 * I, H), 1.0 / math.sqrt(H), case.dtype)
    w2 = r.normal((E, H, I), 1.0 / math.sqrt(I), case.dtype)
    return w13, w2


def _sub_op_ids(case: Case, r: _Rand) -> torch.Tensor:
    T, E, K = case.shape["T"], case.shape["E"], case.shape["K"]
    ids = r.distinct_ids(T, E, K)
    if case.options.get("edge") == "one_expert":
        ids[:, 0] = ONE_EXPERT
    return ids


def make_inputs(case: Case, device: torch.device, align: int = 1) -> dict:
    """A dict of the case's tensors and arguments (see the module docstring)."""
    r = _Rand(device, case.seed)
    s, o = case.shape, case.options
    T, H, E, K = s["T"], s["H"], s["E"], s["K"]
    x = r.normal((T, H), 1.0, case.dtype)
    if o.get("edge") == "nan_row" and T > 2:
        x[2] = float("nan")
    out: dict = {"x": x, "num_experts": E, "case_options": o}
    if case.op in ("moe_gating", "moe_forward", "quant_moe_forward"):
        kw = routing_kwargs(case, r)
        out["gate_weight"] = _gate_weight(case, r, kw)
        out["top_k"] = K
        if o.get("forced"):
            kw["forced_expert_ids"] = r.distinct_ids(T, E, K)
        out["routing"] = kw
    if case.op in ("moe_forward", "quant_moe_forward"):
        out["w13"], out["w2"] = _experts(case, r)
        if o.get("shared"):
            I = s["I"]
            out["shared_w13"] = r.normal((2 * I, H), 1.0 / math.sqrt(H), case.dtype)
            out["shared_w2"] = r.normal((H, I), 1.0 / math.sqrt(I), case.dtype)
            if o.get("shared_gate"):
                out["shared_gate"] = r.normal((1, H), 1.0 / math.sqrt(H), case.dtype)
    if case.op in ("moe_permute", "moe_experts", "moe_combine"):
        ids = _sub_op_ids(case, r)
        out["topk_ids"] = ids
        align = o.get("align", align)
        out["align"] = align
        px, _counts, ends, _row_src, pair_row = permute_reference(x, ids, E, align)
        if case.op == "moe_experts":
            out["permuted_x"], out["group_ends"] = px, ends
            out["w13"], out["w2"] = _experts(case, r)
        if case.op == "moe_combine":
            out["expert_out"] = r.normal((px.shape[0], H), 1.0, case.dtype)
            out["pair_row"] = pair_row
            out["topk_weights"] = r.uniform((T, K))
    return out
