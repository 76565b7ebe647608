"""The batch-invariant mode (``mo.deterministic()``, ``MOJO_DETERMINISTIC=1``): each token's output,
and its input gradient, bit-identical whatever the token count and whatever other tokens share the
call, and run to run; backends decline it unless they declare it (CPU: the reference, and the
triton kernels in the interpreter, fp32)."""
import dataclasses

import pytest
import torch

import mojo_opset as mo
from mojo_opset import dispatch, registry
from mojo_opset.contract import CALL_TYPES
from mojo_opset.reference import invariant

H, I, E, K = 64, 32, 8, 2
TOKENS = (1, 2, 3, 5, 8, 17, 33, 64)
ROUTINGS = {
    "softmax": dict(route_norm=True),
    "grouped": dict(score_func="sigmoid", route_norm=True, route_scale=2.5, num_expert_groups=4,
                    num_limited_groups=2),
}


def _weights(seed=0, shared=False):
    g = torch.Generator().manual_seed(seed)
    w = {"gate_weight": torch.randn(E, H, generator=g) * 0.2, "w13": torch.randn(E, 2 * I, H, generator=g) * 0.1,
         "w2": torch.randn(E, H, I, generator=g) * 0.1}
    if shared:
        # I_s = 32: on the CPU a row is invariant when its feature sizes are whole vector chunks (16 floats);
        # torch rounds exp-based ops differently in the scalar tail of a vectorised kernel
        w.update(shared_w13=torch.randn(64, H, generator=g) * 0.1, shared_w2=torch.randn(H, 32, generator=g) * 0.1,
                 shared_gate=torch.randn(1, H, generator=g) * 0.1)
    return w


def _pool(n=80, seed=1):
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


def _forward(pool, rows, w, backend, routing, expert_bias=None):
    w = dict(w)
    gate, w13, w2 = w.pop("gate_weight"), w.pop("w13"), w.pop("w2")
    return mo.moe_forward(pool[rows], gate, w13, w2, K, backend=backend, expert_bias=expert_bias, **routing, **w)


def _backends():
    out = ["torch"]
    entry = registry.get_entry("triton")
    if entry is not None and entry.availability()[0]:
        out.append("triton")
    return out


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("backend", _backends())
def test_each_token_is_bit_identical_whatever_the_batch(backend, routing):
    w, pool = _weights(shared=backend == "torch"), _pool()
    bias = torch.randn(E, generator=torch.Generator().manual_seed(3)) * 0.01 if routing == "grouped" else None
    kw = ROUTINGS[routing]
    with mo.deterministic(), mo.strict():
        alone = _forward(pool, [0], w, backend, kw, bias)[0]
        for T in TOKENS:
            first = _forward(pool, list(range(T)), w, backend, kw, bias)
            # the same token last, among other tokens, in another order
            mates = list(range(T + 5, 5, -1)) + [0]
            last = _forward(pool, mates, w, backend, kw, bias)
            assert torch.equal(first[0], alone), (T, "first")
            assert torch.equal(last[-1], alone), (T, "last")
        assert torch.equal(_forward(pool, list(range(33)), w, backend, kw, bias), first[:33])   # run to run
        assert mo.last_served("moe_forward")["served_by"] in ("kernel", "reference")


def test_the_reference_gradient_of_each_token_is_batch_invariant():
    w, pool = _weights(shared=True), _pool()
    for name in ("gate_weight", "w13", "w2"):
        w[name] = w[name].clone().requires_grad_(True)

    def grads(rows, g_seed=5):
        x = pool[rows].clone().requires_grad_(True)
        gate, w13, w2 = w["gate_weight"], w["w13"], w["w2"]
        y = mo.moe_forward(x, gate, w13, w2, K, backend="torch", route_norm=True, shared_w13=w["shared_w13"],
                           shared_w2=w["shared_w2"], shared_gate=w["shared_gate"])
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(g_seed))
        g[rows.index(0)] = torch.randn(H, generator=torch.Generator().manual_seed(7))   # token 0: one gradient
        dx, d13 = torch.autograd.grad(y, (x, w13), g)
        return dx, d13

    with mo.deterministic():
        alone, _ = grads([0])
        for T in (2, 7, 33, 64):
            rows = list(range(T, 0, -1)) + [0]
            dx, d13 = grads(rows)
            assert torch.equal(dx[-1], alone[0]), T
        a, b = grads(list(range(40))), grads(list(range(40)))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])     # run to run, weight gradients too


def test_blocked_products_do_not_see_the_row_count(monkeypatch):
    """The mechanism: a BLAS whose rounding changed with the number of rows would change nothing."""
    real = invariant.F.linear

    def row_count_dependent(x, w, bias=None):
        return real(x, w, bias) + x.shape[0] * 1e-3        # what a different kernel per M could do

    monkeypatch.setattr(invariant.F, "linear", row_count_dependent)
    x, w = _pool(100), torch.randn(16, H)
    full = invariant.linear(x, w)
    for M in (1, 7, 64, 65):
        assert torch.equal(invariant.linear(x[:M], w), full[:M])
    assert not torch.equal(row_count_dependent(x[:1], w), row_count_dependent(x[:7], w)[:1])
    assert torch.equal(invariant.row_sum(x[:3]), invariant.row_sum(x)[:3])


def test_mode_sources_and_precedence(monkeypatch):
    monkeypatch.delenv("MOJO_DETERMINISTIC", raising=False)
    assert not mo.is_deterministic()
    monkeypatch.setenv("MOJO_DETERMINISTIC", "1")
    assert mo.is_deterministic()
    with mo.deterministic(False):
        assert not mo.is_deterministic()
    monkeypatch.setenv("MOJO_DETERMINISTIC", "perhaps")
    with pytest.raises(ValueError, match="MOJO_DETERMINISTIC"):
        mo.is_deterministic()
    monkeypatch.setenv("MOJO_DETERMINISTIC", "off")
    with mo.deterministic():
        assert mo.is_deterministic()


def test_the_mode_reaches_the_calls(monkeypatch):
    seen = []
    real = dispatch.decide

    def spy(call, *a, **k):
        seen.append((call.op, getattr(call, "deterministic", None)))
        return real(call, *a, **k)

    monkeypatch.setattr(dispatch, "decide", spy)
    w, pool = _weights(), _pool()
    monkeypatch.setenv("MOJO_DETERMINISTIC", "1")
    _forward(pool, [0, 1, 2], w, "torch", {})
    ops = {op for op, det in seen if det}
    assert {"moe_gating", "moe_forward", "moe_experts", "moe_combine"} <= ops
    assert all(det in (True, None) for _, det in seen)     # None: permute only moves rows
    assert ("moe_permute", None) in seen


def test_backends_decline_unless_they_declare_it():
    from tests.test_contract import sample_calls

    calls = sample_calls()
    for name in ("triton", "ttx", "npu"):
        entry = registry.get_entry(name)
        if entry is None or not entry.availability()[0]:
            continue
        impls = entry.impls()
        for op, call in calls.items():
            if op not in impls or "deterministic" not in {f.name for f in dataclasses.fields(call)}:
                continue
            det = dataclasses.replace(call, deterministic=True)
            _, impl, served_by, reasons = dispatch.decide(det, name)
            if "deterministic" in impl.options:
                assert not any("deterministic" in r for r in reasons), (name, op, reasons)
            else:
                assert served_by == "fallback" and any("deterministic=True is not implemented" in r
                                                       for r in reasons), (name, op, reasons)
    assert "deterministic" not in {f.name for f in dataclasses.fields(CALL_TYPES["moe_permute"])}


def test_a_deterministic_training_call_skips_a_backward_that_is_not_invariant():
    if "triton" not in _backends():
        pytest.skip("triton backend unavailable")
    from tests.test_contract import sample_calls

    call = sample_calls()["moe_forward"]
    w13 = call.w13.clone().requires_grad_(True)
    det = dataclasses.replace(call, w13=w13, deterministic=True)
    _, _, served_by, reasons = dispatch.decide(det, "triton")
    assert served_by == "fallback" and any("backward is not batch-invariant" in r for r in reasons)
    with torch.no_grad():
        assert dispatch.decide(det, "triton")[2] == "kernel"
    assert dispatch.decide(dataclasses.replace(det, deterministic=False), "triton")[2] == "kernel"
