"""SPEC §3.1: every routing option of the reference against hand-computed small cases, plus the
fp32 router GEMM's memory and gradient contract."""
import math

import numpy as np
import pytest
import torch

import mojo_opset as mo
from mojo_opset.reference.router_gemm import router_logits
from naive_moe import naive_ids, naive_scores

INF = math.inf


def sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def softmax_list(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def route(logits, top_k, **kw):
    """Route with logits given directly: x = logits, gate_weight = I, so x @ gate_weight.T = logits."""
    x = torch.tensor(logits, dtype=torch.float32)
    E = x.shape[-1]
    return mo.moe_gating(x, torch.eye(E), top_k, return_scores=True, **kw)


def ids_of(logits, top_k, **kw):
    return route(logits, top_k, **kw)[0].tolist()


def close(t, expected, **kw):
    torch.testing.assert_close(t, torch.tensor(expected, dtype=t.dtype), **kw)


# --------------------------------------------------------------------------- scores and weights

def test_softmax_top2_hand_computed():
    ids, w, scores = route([[1.0, 2.0, 3.0, 0.0]], 2)
    p = softmax_list([1.0, 2.0, 3.0, 0.0])
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and scores.dtype == torch.float32
    assert ids.tolist() == [[2, 1]]
    close(w, [[p[2], p[1]]])
    close(scores, [p])


def test_sigmoid_top2_hand_computed():
    ids, w, _ = route([[0.0, 2.0, -1.0, 1.0]], 2, score_func="sigmoid")
    assert ids.tolist() == [[1, 3]]
    close(w, [[sig(2.0), sig(1.0)]])


def test_gate_bias_is_added_to_logits():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    ids, w = mo.moe_gating(x, torch.eye(4), 2, gate_bias=torch.tensor([5.0, 0.0, 0.0, 0.0]))
    p = softmax_list([6.0, 2.0, 3.0, 0.0])
    assert ids.tolist() == [[0, 2]]
    close(w, [[p[0], p[2]]])


def test_route_norm_divides_by_sum():
    ids, w, _ = route([[0.0, 2.0, -1.0, 1.0]], 2, score_func="sigmoid", route_norm=True)
    a, b = sig(2.0), sig(1.0)
    close(w, [[a / (a + b), b / (a + b)]])


def test_route_norm_epsilon_keeps_zero_weights_finite():
    # sigmoid(-200) underflows to 0 in fp32: 0 / (0 + 1e-20) = 0, not NaN
    ids, w, scores = route([[-200.0, -200.0, -200.0]], 2, score_func="sigmoid", route_norm=True)
    assert scores.eq(0).all()
    assert ids.tolist() == [[0, 1]]
    assert torch.equal(w, torch.zeros(1, 2))


def test_route_scale_multiplies_after_norm():
    _, w, _ = route([[0.0, 2.0, -1.0, 1.0]], 2, score_func="sigmoid", route_norm=True, route_scale=2.5)
    a, b = sig(2.0), sig(1.0)
    close(w, [[2.5 * a / (a + b), 2.5 * b / (a + b)]])
    _, w, _ = route([[0.0, 2.0, -1.0, 1.0]], 2, score_func="sigmoid", route_scale=2.5)
    close(w, [[2.5 * a, 2.5 * b]])
    _, w, _ = route([[0.0, 2.0, -1.0, 1.0]], 2, score_func="sigmoid", route_scale=np.float32(0.5))  # any real
    close(w, [[0.5 * a, 0.5 * b]])


def test_expert_bias_changes_selection_not_weights():
    logits = [[0.0, 1.0, 2.0, 3.0]]
    p = softmax_list(logits[0])
    ids, w, _ = route(logits, 2)
    assert ids.tolist() == [[3, 2]]
    ids, w, scores = route(logits, 2, expert_bias=torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert ids.tolist() == [[0, 3]]  # p0 + 1 beats every unbiased score
    close(w, [[p[0], p[3]]])         # the weights are the unbiased scores
    close(scores, [p])


def test_lowest_id_wins_ties():
    assert ids_of([[1.0, 3.0, 3.0, 1.0, 3.0]], 2) == [[1, 2]]
    assert ids_of([[1.0, 3.0, 3.0, 1.0, 3.0]], 3) == [[1, 2, 4]]
    assert ids_of([[1.0, 3.0, 3.0, 1.0, 3.0]], 5) == [[1, 2, 4, 0, 3]]
    assert ids_of([[0.0] * 6], 3, score_func="sigmoid") == [[0, 1, 2]]


# --------------------------------------------------------------------------- router dtype

def test_router_dtype_fp32_vs_input_dtype():
    # logits 1 and 1 + 2^-8: distinct in fp32, both round to 1.0 in bf16 (ties go to expert 0)
    x = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)
    gw = torch.tensor([[1.0, 0.0], [1.0, 2.0 ** -8]], dtype=torch.bfloat16)
    ids32, w32, s32 = mo.moe_gating(x, gw, 1, return_scores=True)
    idsn, wn, sn = mo.moe_gating(x, gw, 1, router_dtype=None, return_scores=True)
    assert ids32.tolist() == [[1]] and idsn.tolist() == [[0]]
    assert s32.dtype == sn.dtype == torch.float32 and w32.dtype == wn.dtype == torch.float32
    close(w32, [[softmax_list([1.0, 1.0 + 2.0 ** -8])[1]]])
    close(wn, [[0.5]])
    assert router_logits(x, gw, None, torch.float32).dtype == torch.float32
    assert router_logits(x, gw, None, None).dtype == torch.bfloat16


# --------------------------------------------------------------------------- group-limited routing

def test_group_top2_sum_vs_max():
    # groups {0,1} = [3, -3] and {2,3} = [1, 1] (sigmoid): max prefers group 0 (0.95 > 0.73),
    # top2_sum prefers group 1 (1.46 > 1.00); without groups the top-2 is {0, 2}
    logits = [[3.0, -3.0, 1.0, 1.0]]
    kw = dict(score_func="sigmoid", num_expert_groups=2, num_limited_groups=1)
    assert ids_of(logits, 2, score_func="sigmoid") == [[0, 2]]
    assert ids_of(logits, 2, group_score="top2_sum", **kw) == [[2, 3]]
    assert ids_of(logits, 2, group_score="max", **kw) == [[0, 1]]
    _, w, _ = route(logits, 2, group_score="max", **kw)
    close(w, [[sig(3.0), sig(-3.0)]])


def test_group_ties_go_to_lower_group():
    logits = [[0.0, 2.0, 2.0, 0.0]]  # both groups score sig(2) + sig(0) (and max sig(2))
    for gs in ("top2_sum", "max"):
        assert ids_of(logits, 2, score_func="sigmoid", num_expert_groups=2, num_limited_groups=1,
                      group_score=gs) == [[1, 0]]
    assert ids_of(logits, 2, score_func="sigmoid") == [[1, 2]]
    assert ids_of([[1.0] * 4], 2, num_expert_groups=2, num_limited_groups=1) == [[0, 1]]


def test_groups_of_one_expert_use_their_value():
    logits = [[0.0, 2.0, 1.0, 3.0]]
    for gs in ("top2_sum", "max"):
        kw = dict(num_expert_groups=4, group_score=gs)
        assert ids_of(logits, 2, num_limited_groups=2, **kw) == [[3, 1]]
        assert ids_of(logits, 1, num_limited_groups=1, **kw) == [[3]]
    # with a bias that lifts expert 0's group into the kept set
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0])
    assert ids_of(logits, 2, num_expert_groups=4, num_limited_groups=2, expert_bias=bias) == [[0, 3]]


def test_group_choice_uses_expert_bias():
    # group score is computed on the biased choice: bias lifts group {0,1} over {2,3}
    logits = [[0.0, 0.0, 1.0, 1.0]]
    kw = dict(score_func="sigmoid", num_expert_groups=2, num_limited_groups=1)
    assert ids_of(logits, 1, **kw) == [[2]]
    ids, w, _ = route(logits, 1, expert_bias=torch.tensor([0.0, 0.5, 0.0, 0.0]), **kw)
    assert ids.tolist() == [[1]]
    close(w, [[0.5]])  # sig(0), unbiased


def test_excluded_group_never_chosen_even_when_its_expert_scores_highest():
    # expert 0 has the highest score, but its group {0,1,2} scores lowest under top2_sum
    logits = [[5.0, -5.0, -5.0, 2.0, 2.0, 2.0]]
    assert ids_of(logits, 2, score_func="sigmoid", num_expert_groups=2, num_limited_groups=1) == [[3, 4]]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups", [(1, None, "top2_sum"), (4, 2, "top2_sum"), (4, 2, "max"), (8, 3, "top2_sum"),
                                    (2, 1, "max")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_random_routing_matches_naive(score_func, groups, with_bias):
    """Small integer logits make many exact ties between experts and between groups."""
    G, L, gs = groups
    g = torch.Generator().manual_seed(G * 10 + (L or 0) + with_bias)
    T, E, K = 64, 8, 3
    x = torch.randint(-2, 3, (T, E), generator=g).float()
    bias = (torch.randint(-1, 2, (E,), generator=g).float() * 0.25) if with_bias else None
    ids, w, scores = mo.moe_gating(x, torch.eye(E), K, score_func=score_func, expert_bias=bias, num_expert_groups=G,
                                   num_limited_groups=L, group_score=gs, return_scores=True)
    ref_scores = naive_scores(x, torch.eye(E), score_func=score_func)
    want = naive_ids(ref_scores, K, expert_bias=bias, num_expert_groups=G, num_limited_groups=L, group_score=gs)
    assert torch.equal(ids.long(), want)
    torch.testing.assert_close(w, ref_scores.gather(1, want))


# --------------------------------------------------------------------------- NaN

def test_nan_row_picks_first_k_experts_with_nan_weights():
    x = torch.tensor([[float("nan")] * 4, [0.0, 1.0, 2.0, 3.0]])
    for kw in ({}, {"score_func": "sigmoid"}, {"expert_bias": torch.tensor([0.0, 0.0, 0.0, 9.0])},
               {"num_expert_groups": 2, "num_limited_groups": 1}, {"route_norm": True}):
        ids, w = mo.moe_gating(x, torch.eye(4), 2, **kw)
        assert ids[0].tolist() == [0, 1], kw
        assert torch.isnan(w[0]).all(), kw
        assert torch.isfinite(w[1]).all(), kw
        assert ids.min() >= 0 and ids.max() < 4


def test_nan_ranks_below_minus_inf():
    # sigmoid scores: expert 0 is NaN (its gate row is NaN); expert 1 is disabled by a -inf bias.
    # Mapping NaN to -inf would tie them and pick expert 0 first.
    gw = torch.eye(3)
    gw[0] = float("nan")
    x = torch.ones(1, 3)
    ids, w = mo.moe_gating(x, gw, 3, score_func="sigmoid", expert_bias=torch.tensor([0.0, -INF, 0.0]))
    assert ids.tolist() == [[2, 1, 0]]
    assert torch.isnan(w[0, 2]) and torch.isfinite(w[0, :2]).all()
    # same rule inside a kept group: group {0,1,2} wins on its max (expert 2's bias)
    gw = torch.eye(6)
    gw[0] = float("nan")
    ids, _ = mo.moe_gating(torch.ones(1, 6), gw, 3, score_func="sigmoid", num_expert_groups=2, num_limited_groups=1,
                           group_score="max", expert_bias=torch.tensor([0.0, -INF, 5.0, 0.0, 0.0, 0.0]))
    assert ids.tolist() == [[2, 1, 0]]


# --------------------------------------------------------------------------- router replay

def test_forced_ids_used_as_given_with_fresh_weights():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    gw = torch.randn(6, 8, requires_grad=True)
    forced = torch.tensor([[1, 0], [5, 3], [2, 4], [0, 5]], dtype=torch.int16)
    ids, w, scores = mo.moe_gating(x, gw, 2, forced_expert_ids=forced, route_norm=True, route_scale=2.0,
                                   expert_bias=torch.full((6,), 100.0), num_expert_groups=3, num_limited_groups=1,
                                   return_scores=True)
    assert ids.dtype == torch.int32 and ids.tolist() == forced.tolist()  # order kept, bias/groups ignored
    s = torch.softmax(x @ gw.detach().t(), -1).gather(1, forced.long())
    torch.testing.assert_close(w.detach(), 2.0 * s / s.sum(-1, keepdim=True))
    w.sum().backward()  # the router keeps its gradient
    assert gw.grad is not None and gw.grad.abs().sum() > 0


def test_forced_ids_equal_to_natural_give_identical_routing():
    torch.manual_seed(1)
    x = torch.randn(16, 8)
    gw = torch.randn(8, 8)
    kw = dict(score_func="sigmoid", route_norm=True, route_scale=2.5, expert_bias=torch.randn(8) * 0.1,
              num_expert_groups=4, num_limited_groups=2)
    ids, w = mo.moe_gating(x, gw, 3, **kw)
    ids_f, w_f = mo.moe_gating(x, gw, 3, forced_expert_ids=ids, **kw)
    assert torch.equal(ids, ids_f) and torch.equal(w, w_f)


def test_forced_ids_moved_to_x_device():
    x = torch.empty(3, 4, device="meta")
    gw = torch.empty(5, 4, device="meta")
    ids, w = mo.moe_gating(x, gw, 2, forced_expert_ids=torch.tensor([[0, 1], [2, 3], [4, 0]]))
    assert ids.device.type == "meta" and ids.shape == (3, 2) and w.shape == (3, 2)


def test_leading_dims_and_empty():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8)
    gw = torch.randn(4, 8)
    ids, w = mo.moe_gating(x, gw, 2)
    ids2, w2 = mo.moe_gating(x.reshape(6, 8), gw, 2)
    assert ids.shape == (6, 2) and torch.equal(ids, ids2) and torch.equal(w, w2)
    ids, w, s = mo.moe_gating(torch.zeros(0, 8), gw, 2, return_scores=True)
    assert ids.shape == (0, 2) and ids.dtype == torch.int32 and w.shape == (0, 2) and s.shape == (0, 4)


# --------------------------------------------------------------------------- fp32 router GEMM

def _saved(fn):
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, packed


@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_router_saves_original_operands(with_bias):
    T, H, E = 5, 16, 4
    torch.manual_seed(3)
    x = torch.randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    gw = torch.randn(E, H, dtype=torch.bfloat16, requires_grad=True)
    gb = torch.randn(E, dtype=torch.bfloat16, requires_grad=True) if with_bias else None
    logits, packed = _saved(lambda: router_logits(x, gw, gb, torch.float32))
    assert logits.dtype == torch.float32
    assert sorted(tuple(p.shape) for p in packed) == sorted([(T, H), (E, H)])
    assert all(p.dtype == torch.bfloat16 for p in packed)
    assert {p.data_ptr() for p in packed} == {x.data_ptr(), gw.data_ptr()}
    # through the whole gating op: no fp32 tensor of x's or gate_weight's shape is saved
    _, packed = _saved(lambda: mo.moe_gating(x, gw, 2, gate_bias=gb, route_norm=True))
    big = [p for p in packed if p.dtype == torch.float32 and tuple(p.shape) in ((T, H), (E, H))]
    assert not big


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp32_router_gradients_in_original_dtypes(dtype):
    T, H, E = 7, 16, 5
    torch.manual_seed(4)
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    gw = torch.randn(E, H, dtype=dtype, requires_grad=True)
    gb = torch.randn(E, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, E)
    router_logits(x, gw, gb, torch.float32).backward(grad)
    xf, gwf, gbf = (t.detach().float().requires_grad_() for t in (x, gw, gb))
    (xf @ gwf.t() + gbf).backward(grad)
    for got, ref in ((x.grad, xf.grad), (gw.grad, gwf.grad), (gb.grad, gbf.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, ref.to(dtype), rtol=0, atol=0)  # fp32 math, one final rounding


def test_fp32_router_mixed_operand_dtypes():
    torch.manual_seed(5)
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    gw = torch.randn(4, 8, dtype=torch.float32, requires_grad=True)
    router_logits(x, gw, None, torch.float32).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and gw.grad.dtype == torch.float32
    torch.testing.assert_close(gw.grad, x.detach().float().sum(0).expand(4, 8))


def test_gating_gradient_matches_fp32_autograd():
    torch.manual_seed(6)
    x = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    gw = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    ids, w = mo.moe_gating(x, gw, 2, route_norm=True)
    g = torch.randn_like(w)
    w.backward(g)
    xf, gwf = (t.detach().float().requires_grad_() for t in (x, gw))
    s = torch.softmax(xf @ gwf.t(), -1).gather(1, ids.long())
    (s / (s.sum(-1, keepdim=True) + 1e-20)).backward(g)
    torch.testing.assert_close(x.grad, xf.grad.to(torch.bfloat16))
    torch.testing.assert_close(gw.grad, gwf.grad.to(torch.bfloat16))
