"""The triton backend's routing kernel (moe_gating) against the reference, in the interpreter on CPU."""
import itertools

import pytest
import torch

import mojo_opset as mo
from mojo_opset.contract import GatingCall, RoutingOptions
from mojo_opset.reference.gating import gating_reference

pytestmark = pytest.mark.skipif(not mo.available_backends().get("triton", {}).get("available"),
                                reason="triton backend unavailable")


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["packed max", "max, count, min"])
def selection(request, monkeypatch):
    """Both ways the kernel picks an expert (gating_kernel.PACKED_MAX_TILE): same ids, same weights."""
    from mojo_opset_triton import gating_kernel

    monkeypatch.setattr(gating_kernel, "PACKED_MAX_TILE", 1 << 20 if request.param == "packed max" else 0)
    return request.param


def _kernel(logits, top_k, forced=None, **kw):
    opts = dict(score_func="softmax", route_norm=False, route_scale=1.0, expert_bias=None, num_expert_groups=1,
                num_limited_groups=None, group_score="top2_sum")
    opts.update(kw)
    if opts["num_limited_groups"] is None:
        opts["num_limited_groups"] = opts["num_expert_groups"]
    out = torch.ops.mojo_triton.moe_gating(logits, opts["expert_bias"], forced, top_k, opts["score_func"],
                                           opts["route_norm"], opts["route_scale"], opts["num_expert_groups"],
                                           opts["num_limited_groups"], opts["group_score"])
    ref = gating_reference(logits, top_k, forced_expert_ids=forced, **opts)
    return out, ref


def _check(out, ref, ids_exact=True):
    assert out[0].dtype == torch.int32 and out[1].dtype == torch.float32 and out[2].dtype == torch.float32
    if ids_exact:
        assert torch.equal(out[0].cpu(), ref[0].cpu())
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-6, equal_nan=True)


GROUPS = [(1, None, "top2_sum"), (4, 2, "top2_sum"), (4, 1, "max"), (8, 3, "top2_sum")]
# every group option with both score functions, each flag both ways (a covering subset of the product)
OPTIONS = [(sf, norm, scale, bias, grp)
           for (sf, norm, scale, bias), grp in itertools.product(
               [("softmax", False, 1.0, False), ("sigmoid", True, 2.5, True),
                ("softmax", True, 1.0, True), ("sigmoid", False, 2.5, False)], GROUPS)]


@pytest.mark.parametrize("score_func,norm,scale,bias,groups", OPTIONS)
def test_routing_options_match_reference(score_func, norm, scale, bias, groups, selection):
    g = torch.Generator().manual_seed(hash((score_func, norm, scale, bias, groups)) % 2**31)
    T, E, K = 9, 32, 4
    x = torch.randn(T, 16, generator=g).to(_dev())
    gw = torch.randn(E, 16, generator=g).to(_dev())
    eb = (torch.randn(E, generator=g) * 0.05).to(_dev()) if bias else None
    G, L, gs = groups
    with mo.strict():
        ids, w, s = mo.moe_gating(x, gw, K, score_func=score_func, route_norm=norm, route_scale=scale,
                                  expert_bias=eb, num_expert_groups=G, num_limited_groups=L, group_score=gs,
                                  backend="triton", return_scores=True)
    assert mo.last_served("moe_gating")["served_by"] == "kernel"
    rids, rw, rs = mo.moe_gating(x, gw, K, score_func=score_func, route_norm=norm, route_scale=scale,
                                 expert_bias=eb, num_expert_groups=G, num_limited_groups=L, group_score=gs,
                                 backend="torch", return_scores=True)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ties_go_to_lower_id(dtype, selection):
    # few distinct values: many exact ties, in scores, choices and group scores
    g = torch.Generator().manual_seed(1)
    logits = torch.randint(0, 3, (16, 24), generator=g).to(dtype).to(_dev())
    for kw in [{}, dict(score_func="sigmoid", num_expert_groups=6, num_limited_groups=2),
               dict(num_expert_groups=4, num_limited_groups=2, group_score="max")]:
        _check(*_kernel(logits, 5, **kw))
    const = torch.zeros(3, 12, dtype=dtype, device=_dev())
    out, ref = _kernel(const, 4)
    assert out[0].tolist() == [[0, 1, 2, 3]] * 3
    _check(out, ref)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_nan_rows_pick_valid_ids(score_func, selection):
    logits = torch.randn(5, 10, device=_dev())
    logits[1] = float("nan")
    logits[3, 2] = float("nan")
    logits[4, :7] = float("nan")
    for kw in [{}, dict(num_expert_groups=5, num_limited_groups=2), dict(expert_bias=torch.randn(10, device=_dev()))]:
        out, ref = _kernel(logits, 4, score_func=score_func, **kw)
        _check(out, ref)
        assert int(out[0].min()) >= 0 and int(out[0].max()) < 10
    out, _ = _kernel(logits, 4, score_func=score_func)
    assert out[0][1].tolist() == [0, 1, 2, 3]


def test_nan_ranks_below_minus_inf(selection):
    # expert bias of -inf: those experts still rank above the NaN ones
    logits = torch.randn(2, 8, device=_dev())
    logits[:, 0] = float("nan")
    bias = torch.zeros(8, device=_dev())
    bias[1:] = float("-inf")
    out, ref = _kernel(logits, 3, score_func="sigmoid", expert_bias=bias)
    _check(out, ref)
    assert out[0][0].tolist() == [1, 2, 3]


def test_forced_ids_served_natively():
    g = torch.Generator().manual_seed(3)
    T, E, K = 6, 16, 3
    logits = torch.randn(T, E, generator=g).to(_dev())
    forced = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(_dev())
    out, ref = _kernel(logits, K, forced=forced, route_norm=True, route_scale=2.0)
    _check(out, ref)
    assert torch.equal(out[0].long(), forced)
    # forcing the natural routing reproduces it bit for bit
    nat, _ = _kernel(logits, K, route_norm=True, route_scale=2.0)
    again, _ = _kernel(logits, K, forced=nat[0].long(), route_norm=True, route_scale=2.0)
    assert torch.equal(again[0], nat[0]) and torch.equal(again[1], nat[1])
    with mo.strict():
        x = torch.randn(T, 8, device=_dev())
        gw = torch.randn(E, 8, device=_dev())
        ids, _ = mo.moe_gating(x, gw, K, forced_expert_ids=forced, backend="triton")
    assert mo.last_served("moe_gating")["served_by"] == "kernel"
    assert torch.equal(ids.long(), forced)


def test_non_contiguous_and_low_precision_logits():
    base = torch.randn(20, 7, device=_dev())
    _check(*_kernel(base.t(), 3))                                   # [7, 20] with strides (1, 7)
    _check(*_kernel(torch.randn(7, 40, device=_dev())[:, ::2], 3))  # column stride 2
    _check(*_kernel(torch.randn(7, 20, device=_dev()).half(), 3, score_func="sigmoid"))


@pytest.mark.parametrize("T", [0, 1])
def test_tiny_token_counts(T):
    x = torch.randn(T, 8, device=_dev())
    gw = torch.randn(6, 8, device=_dev())
    with mo.strict():
        ids, w, s = mo.moe_gating(x, gw, 2, route_norm=True, backend="triton", return_scores=True)
    assert ids.shape == (T, 2) and w.shape == (T, 2) and s.shape == (T, 6)
    rids, rw = mo.moe_gating(x, gw, 2, route_norm=True, backend="torch")
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw)


def test_top_k_equals_e_and_single_expert_groups():
    logits = torch.randn(4, 6, device=_dev())
    _check(*_kernel(logits, 6))
    _check(*_kernel(logits, 2, num_expert_groups=6, num_limited_groups=3))  # groups of one expert


def test_gradients_flow_through_rebuilt_weights():
    x = torch.randn(5, 8, device=_dev(), requires_grad=True)
    gw = torch.randn(12, 8, device=_dev(), requires_grad=True)
    with mo.strict():
        ids, w = mo.moe_gating(x, gw, 3, route_norm=True, backend="triton")
    (w * torch.arange(3.0, device=_dev())).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    gw2 = gw.detach().clone().requires_grad_()
    rids, rw = mo.moe_gating(x2, gw2, 3, route_norm=True, backend="torch")
    (rw * torch.arange(3.0, device=_dev())).sum().backward()
    assert torch.equal(ids, rids)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(gw.grad, gw2.grad)


def test_declines_with_reasons():
    impl = mo.registry.get_entry("triton").impls()["moe_gating"]
    big = torch.empty(2, 8192, device=_dev())
    r = impl.declared_reasons(GatingCall(logits=big, routing=RoutingOptions(top_k=2)))
    assert any("8192" in s for s in r)
    x = torch.randn(2, 4, device=_dev())
    gw = torch.randn(8192, 4, device=_dev())
    with mo.strict(), pytest.raises(mo.StrictFallbackError, match="limit"):
        mo.moe_gating(x, gw, 2, backend="triton")
    ids, _ = mo.moe_gating(x, gw, 2, backend="triton")   # not strict: the reference serves it
    assert mo.last_served("moe_gating")["served_by"] == "fallback"
    assert ids.shape == (2, 2)
