"""NaN choices rank below every number, -inf included (SPEC §3.1 step 5), on every backend: the ttx
routing kernel once mapped NaN to -inf and so ranked NaN level with -inf (lowest id first)."""
import itertools

import pytest
import torch

import mojo_opset as mo
from mojo_opset.reference.gating import gating_reference

NAN, INF = float("nan"), float("inf")
H = 8
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _kernel():
    if not mo.available_backends().get("ttx", {}).get("available"):
        pytest.skip("ttx backend unavailable")
    from mojo_opset_ttx.gating_kernel import gating

    return gating


def _check(ids, w, scores, logits, **kw):
    ref = gating_reference(logits, **kw)
    assert torch.equal(ids, ref[0]), (ids, ref[0])
    torch.testing.assert_close(w, ref[1], rtol=1e-6, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(scores, ref[2], rtol=1e-6, atol=1e-7, equal_nan=True)


def _kw(top_k, score_func="sigmoid", expert_bias=None, G=1, L=None, group_score="top2_sum"):
    return dict(top_k=top_k, score_func=score_func, route_norm=False, route_scale=1.0, expert_bias=expert_bias,
                num_expert_groups=G, num_limited_groups=G if L is None else L, group_score=group_score)


def test_ttx_kernel_nan_bias_below_minus_inf():
    """The issue's case: bias [nan, -inf, -inf, 0], sigmoid, top 2 -> experts 3 then 1 (not 0)."""
    gating = _kernel()
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    kw = _kw(2, expert_bias=torch.tensor([NAN, -INF, -INF, 0.0]))
    ids, w, scores = gating(logits, **kw)
    assert ids.tolist() == [[3, 1]] * 5
    _check(ids, w, scores, logits, **kw)


# values that rank against each other in every way: NaN, +-inf, ties and plain numbers
SPECIAL = torch.tensor([NAN, -INF, INF, 0.0, 0.0, -1.0, 2.0])


@pytest.mark.parametrize("score_func,groups", list(itertools.product(
    ["sigmoid", "softmax"], [(1, None, "top2_sum"), (4, 2, "top2_sum"), (4, 2, "max"), (2, 1, "top2_sum")])))
def test_ttx_kernel_matches_reference_on_nan_and_inf(score_func, groups):
    gating = _kernel()
    G, L, gs = groups
    E, K, T = 8, 3, 48
    g = torch.Generator().manual_seed(1)
    pick = lambda *shape: SPECIAL[torch.randint(len(SPECIAL), shape, generator=g)]   # noqa: E731
    logits = torch.randn(T, E, generator=g)
    logits[: T // 2] = torch.where(torch.rand(T // 2, E, generator=g) < 0.3, pick(T // 2, E), logits[: T // 2])
    for trial in range(4):
        bias = pick(E) if trial else torch.tensor([NAN, -INF, -INF, NAN, 0.0, -INF, NAN, 1.0])
        kw = _kw(K, score_func, bias, G, L, gs)
        _check(*gating(logits, **kw), logits, **kw)
    kw = _kw(K, score_func, None, G, L, gs)
    _check(*gating(logits, **kw), logits, **kw)


@pytest.mark.parametrize("backend", ["torch", "triton", "ttx"])
def test_moe_gating_nan_bias_on_every_backend(backend):
    """The public op, whichever implementation serves it."""
    if not mo.available_backends().get(backend, {}).get("available"):
        pytest.skip(f"backend {backend} unavailable")
    g = torch.Generator().manual_seed(2)
    x, gw = torch.randn(6, H, generator=g), torch.randn(4, H, generator=g)
    ids, _ = mo.moe_gating(x, gw, 2, score_func="sigmoid", expert_bias=torch.tensor([NAN, -INF, -INF, 0.0]),
                           backend=backend)
    assert ids.tolist() == [[3, 1]] * 6
    ids, _ = mo.moe_gating(x, gw, 3, score_func="sigmoid", expert_bias=torch.tensor([NAN, -INF, NAN, -INF]),
                           backend=backend)
    assert ids.tolist() == [[1, 3, 0]] * 6


@pytest.mark.parametrize("backend", ["triton", "ttx"])
@pytest.mark.parametrize("score_func,groups", list(itertools.product(
    ["sigmoid", "softmax"], [(1, None, "top2_sum"), (4, 2, "top2_sum"), (4, 2, "max")])))
def test_moe_gating_special_bias_matches_reference(backend, score_func, groups):
    """Every kernel backend through the public op: NaN, +-inf and tied biases (identity router, so
    the logits are x itself)."""
    if not mo.available_backends().get(backend, {}).get("available"):
        pytest.skip(f"backend {backend} unavailable")
    G, L, gs = groups
    E, K, T = 8, 3, 32
    g = torch.Generator().manual_seed(3)
    x, eye = torch.randn(T, E, generator=g), torch.eye(E)
    kw = dict(score_func=score_func, num_expert_groups=G, num_limited_groups=L, group_score=gs)
    for trial in range(4):
        bias = SPECIAL[torch.randint(len(SPECIAL), (E,), generator=g)] if trial else \
            torch.tensor([NAN, -INF, -INF, NAN, 0.0, -INF, NAN, 1.0])
        ids, w = mo.moe_gating(x, eye, K, expert_bias=bias, backend=backend, **kw)
        ref_ids, ref_w = mo.moe_gating(x, eye, K, expert_bias=bias, backend="torch", **kw)
        assert torch.equal(ids, ref_ids), (backend, bias, ids, ref_ids)
        torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7, equal_nan=True)
