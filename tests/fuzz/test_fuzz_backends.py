"""Property-based fuzzing of every available backend against the torch reference (public API only).

Properties: ids in range and unique per row; ids equal the reference's except at near-ties
(checks.TIE_EPS); outputs within the backend's tolerance of the reference computed on the backend's own
routing; a backend serves a case or declines it with reasons, never crashes; forced ids equal to the
natural routing reproduce the output (bit-identical when the same implementation serves both);
gradients match; quantized forwards match the quantized reference on the same routing, and a scheme's
bad H/I/group size is rejected naming the argument; invalid forced ids are rejected with an error naming
``forced_expert_ids``.  Inputs come in several memory layouts (strided, misaligned offsets, transposed
weights).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import mojo_opset as mo

from .cases import DEVICE, LONG, Case, QuantCase, build, cases, quant_cases
from .checks import assert_close_rows, assert_ids_valid, near_tie_rows
from .record import recorded

# every available kernel backend, or the ones named in MOJO_FUZZ_BACKENDS (e.g. "triton,ttx";
# naming "torch" fuzzes the reference against itself, a check of the harness)
_chosen = [b for b in os.environ.get("MOJO_FUZZ_BACKENDS", "").split(",") if b]
KERNEL_BACKENDS = _chosen or [name for name, info in mo.available_backends().items()
                              if info["available"] and name != "torch"]
pytestmark = pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend available")
SERVED = ("kernel", "fallback", "no override")


def _served_ok():
    for op, rec in mo.last_served().items():
        assert rec["served_by"] in SERVED + ("reference",), (op, rec)
        if rec["served_by"] == "fallback":
            assert rec["reasons"], f"{op} fell back without a reason"


def _valid_rows(case: Case) -> torch.Tensor:
    rows = torch.ones(case.T, dtype=torch.bool, device=DEVICE)
    for r in case.nan_rows + case.inf_rows:
        rows[r] = False
    return rows


def _check_routing(backend: str, case: Case, info: dict, info_ref: dict, kw: dict) -> torch.Tensor:
    """ids valid, equal to the reference's away from near-ties, weights equal where the ids agree;
    returns the backend's ids."""
    ids = info["topk_ids"]
    assert_ids_valid(ids, case.E, case.K, f"{backend} {case.short()}")
    ties = near_tie_rows(info_ref["scores"], case.K, kw.get("expert_bias"), case.routing["num_expert_groups"],
                         case.routing["num_limited_groups"])
    same = (ids == info_ref["topk_ids"]).all(dim=1)
    bad = ~same & ~ties & _valid_rows(case)
    assert not bool(bad.any()), (f"{backend}: ids differ from the reference away from near-ties in "
                                 f"{int(bad.sum())} rows, e.g. row {int(bad.nonzero()[0, 0])}; {case.short()}")
    # where the routing agrees, the weights are the reference's (fp32, from the same logits)
    agree = same & _valid_rows(case)
    assert_close_rows(info["topk_weights"], info_ref["topk_weights"], agree, torch.float32,
                      f"{backend} weights {case.short()}")
    return ids


def _check_forward(backend: str, case: Case, tensors: tuple, y: torch.Tensor, info: dict, what: str):
    """A backend's moe_forward result against the reference: routing as in _check_routing, NaN tokens
    give NaN outputs (never a crash), finite tokens match the reference replaying the backend's ids.
    Returns the backend's ids."""
    x, gw, w13, w2, kw = tensors
    assert y.shape == x.shape and y.dtype == x.dtype
    _, info_ref = mo.moe_forward(x, gw, w13, w2, case.K, return_router_info=True, backend="torch", **kw)
    ids = _check_routing(backend, case, info, info_ref, kw)
    for r in case.nan_rows:
        assert torch.isnan(y[r]).all(), f"{backend}: NaN token {r} did not propagate"
    y_ref_same = mo.moe_forward(x, gw, w13, w2, case.K, backend="torch", forced_expert_ids=ids, **kw)
    assert_close_rows(y, y_ref_same, _valid_rows(case), case.dtype, f"{backend} {what} {case.short()}")
    return ids


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(case=cases())
@example(case=Case(0, 16, 4, 2, 16, torch.float32, 1, dict(score_func="softmax", route_norm=False,
                   route_scale=1.0, num_expert_groups=1, num_limited_groups=None, group_score="top2_sum",
                   router_dtype=torch.float32, gate_bias=False, expert_bias=False)))
@example(case=Case(5, 16, 4, 2, 16, torch.float32, 2, dict(score_func="sigmoid", route_norm=False,
                   route_scale=1.0, num_expert_groups=1, num_limited_groups=None, group_score="top2_sum",
                   router_dtype=torch.float32, gate_bias=False, expert_bias=True),
                   special_bias=((0, float("nan")), (1, float("-inf")), (2, float("-inf")), (3, 0.0))))
def test_forward_matches_reference(backend, case):
    with recorded("forward", backend, case):
        _forward_matches_reference(backend, case)


def _forward_matches_reference(backend, case):
    x, gw, w13, w2, kw = build(case)
    mo.reset_stats()
    y, info = mo.moe_forward(x, gw, w13, w2, case.K, return_router_info=True, backend=backend, **kw)
    _served_ok()
    ids = _check_forward(backend, case, (x, gw, w13, w2, kw), y, info, "forward")

    # replaying the backend's own routing reproduces its output
    kernel_natural = mo.last_served("moe_forward")
    mo.reset_stats()
    y_forced = mo.moe_forward(x, gw, w13, w2, case.K, backend=backend, forced_expert_ids=ids, **kw)
    _served_ok()
    rows = _valid_rows(case)
    if mo.last_served("moe_gating")["served_by"] == "kernel" and kernel_natural:
        assert torch.equal(y_forced[rows], y[rows]), f"{backend}: forced == natural not bit-identical"
    else:
        assert_close_rows(y_forced, y, rows, case.dtype, f"{backend} forced vs natural {case.short()}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(case=cases())
@settings(max_examples=max(1, settings().max_examples // (1 if LONG else 3)))
def test_composed_ops_match_reference(backend, case):
    """The forward composed op by op (``moe_forward`` selected to the reference, every other op to the
    backend, as ``MOJO_BACKEND_MOE_FORWARD=torch MOJO_BACKEND=<backend>`` does): reaches the backend's
    own permute and combine kernels, which a fused ``moe_forward`` never calls."""
    with recorded("composed", backend, case):
        _composed_ops_match_reference(backend, case)


def _composed_ops_match_reference(backend, case):
    x, gw, w13, w2, kw = build(case)
    mo.reset_stats()
    with mo.use_backend(backend), mo.use_backend("torch", ops="moe_forward"):
        y, info = mo.moe_forward(x, gw, w13, w2, case.K, return_router_info=True, **kw)
    _served_ok()
    served = mo.last_served()
    assert served["moe_forward"]["backend"] == "torch", served["moe_forward"]
    if case.T:
        assert {"moe_permute", "moe_combine"} <= set(served), sorted(served)
    _check_forward(backend, case, (x, gw, w13, w2, kw), y, info, "composed")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(qc=quant_cases())
@settings(max_examples=max(1, settings().max_examples // (1 if LONG else 3)))  # the quantized reference is slow
def test_quant_forward_matches_reference(backend, qc: QuantCase):
    with recorded("quant", backend, qc):
        _quant_forward_matches_reference(backend, qc)


def _quant_kernel_expected(backend, qc: QuantCase) -> bool:
    """The triton backend serves every scheme the fuzz draws (int4 groups are powers of two >= 16,
    E <= 1024), fp8 only on a GPU of compute capability 8.9 or newer (not in the interpreter)."""
    if backend != "triton":
        return False
    if qc.scheme.endswith("fp8_block"):
        return DEVICE != "cpu" and torch.cuda.get_device_capability() >= (8, 9)
    return True


def _quant_forward_matches_reference(backend, qc: QuantCase):
    case = qc.case
    x, gw, w13, w2, kw = build(case)
    expected = qc.expected_error()
    if expected is not None:   # a combination the scheme cannot hold: a clear error, not a wrong answer
        with pytest.raises(ValueError, match=expected):
            mo.quantize_experts(w13, w2, qc.scheme, group_size=qc.group_size)
        return
    q = mo.quantize_experts(w13, w2, qc.scheme, group_size=qc.group_size)
    mo.reset_stats()
    y, info = mo.quant_moe_forward(x, gw, q, case.K, return_router_info=True, backend=backend, **kw)
    _served_ok()
    if _quant_kernel_expected(backend, qc):     # a kernel serves it, as under strict: no silent fallback
        rec = mo.last_served("quant_moe_forward")
        assert rec["served_by"] == "kernel", (qc.short(), rec)
    assert y.shape == x.shape and y.dtype == x.dtype
    _, info_ref = mo.quant_moe_forward(x, gw, q, case.K, return_router_info=True, backend="torch", **kw)
    ids = _check_routing(backend, case, info, info_ref, kw)
    y_ref_same = mo.quant_moe_forward(x, gw, q, case.K, backend="torch", forced_expert_ids=ids, **kw)
    assert_close_rows(y, y_ref_same, _valid_rows(case), case.dtype, f"{backend} {qc.short()}")
    y_forced = mo.quant_moe_forward(x, gw, q, case.K, backend=backend, forced_expert_ids=ids, **kw)
    assert_close_rows(y_forced, y, _valid_rows(case), case.dtype, f"{backend} forced vs natural {qc.short()}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(case=cases(allow_odd_inputs=False), data=st.data())
@settings(max_examples=max(1, settings().max_examples // (1 if LONG else 3)))  # backward is slow interpreted
def test_gradients_match_reference(backend, case, data):
    if case.T == 0:
        return
    with recorded("gradients", backend, case):
        _gradients_match_reference(backend, case)


def _gradients_match_reference(backend, case):
    case.dtype = torch.float32
    x, gw, w13, w2, kw = build(case, requires_grad=True)
    y, info = mo.moe_forward(x, gw, w13, w2, case.K, return_router_info=True, backend=backend, **kw)
    _served_ok()
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(case.seed)).to(y)
    grads = torch.autograd.grad((y * probe).sum(), (x, gw, w13, w2))
    xr, gwr, w13r, w2r, kwr = build(case, requires_grad=True)
    yr = mo.moe_forward(xr, gwr, w13r, w2r, case.K, backend="torch", forced_expert_ids=info["topk_ids"], **kwr)
    grads_ref = torch.autograd.grad((yr * probe).sum(), (xr, gwr, w13r, w2r))
    rows = torch.ones(case.T, dtype=torch.bool, device=DEVICE)
    assert_close_rows(y, yr, rows, torch.float32, f"{backend} forward {case.short()}")
    for name, g, gr in zip(("x", "gate_weight", "w13", "w2"), grads, grads_ref):
        g2, gr2 = g.reshape(g.shape[0], -1), gr.reshape(gr.shape[0], -1)
        assert_close_rows(g2, gr2, torch.ones(g2.shape[0], dtype=torch.bool, device=DEVICE), torch.float32,
                          f"{backend} grad {name} {case.short()}")


@st.composite
def bad_forced_ids(draw, case: Case):
    T, K, E = case.T, case.K, case.E
    kind = draw(st.sampled_from(["range", "negative", "dup", "shape", "float"]))
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    if kind == "range":
        ids[draw(st.integers(0, T - 1)), draw(st.integers(0, K - 1))] = E + draw(st.integers(0, 5))
    elif kind == "negative":   # -1 is a partial-replay slot (keeps the natural choice); below is invalid
        ids[draw(st.integers(0, T - 1)), 0] = -draw(st.integers(2, 5))
    elif kind == "dup":
        if K < 2:
            kind, ids = "shape", ids[:, :0]
        else:
            ids[0, 1] = ids[0, 0]
    elif kind == "shape":
        ids = ids[:, :-1] if draw(st.booleans()) else ids[:-1]
    else:
        ids = ids.float()
    return kind, ids


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(data=st.data())
@settings(max_examples=settings().max_examples * (1 if LONG else 3))  # cheap: validation only
def test_invalid_forced_ids_rejected(backend, data):
    case = data.draw(cases(allow_odd_inputs=False).filter(lambda c: c.T > 0))
    kind, ids = data.draw(bad_forced_ids(case))
    x, gw, w13, w2, kw = build(case)
    with recorded("invalid_ids", backend, case, kind=kind):
        with pytest.raises((ValueError, TypeError), match="forced_expert_ids"):
            mo.moe_forward(x, gw, w13, w2, case.K, backend=backend, forced_expert_ids=ids.to(DEVICE), **kw)
