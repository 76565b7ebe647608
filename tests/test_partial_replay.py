"""Partial router replay (SPEC §3.1 step 7): a -1 in forced_expert_ids keeps the natural choice for
that slot; the row's -1 slots take, in slot order, the best eligible experts not forced elsewhere in
the row.  Backends without it decline with a reason."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset.reference.gating import fill_partial, gating_reference, rank_experts


def _layer(T=8, H=16, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g), torch.randn(E, H, generator=g)


def test_fill_rule_by_hand():
    order = torch.tensor([[3, 1, 0, 2, 4]])            # natural ranking, best first
    forced = torch.tensor([[-1, 3, -1]])
    assert fill_partial(forced, order).tolist() == [[1, 3, 0]]   # 3 is taken: the free slots get 1 then 0
    assert fill_partial(torch.tensor([[-1, -1, -1]]), order).tolist() == [[3, 1, 0]]
    assert fill_partial(torch.tensor([[0, -1, 4]]), order).tolist() == [[0, 3, 4]]
    assert fill_partial(torch.tensor([[2, 0, 1]]), order).tolist() == [[2, 0, 1]]


def test_all_minus_one_equals_natural_routing():
    x, gw = _layer()
    ids, w = mo.moe_gating(x, gw, 3, route_norm=True)
    pids, pw = mo.moe_gating(x, gw, 3, route_norm=True, forced_expert_ids=torch.full((8, 3), -1))
    assert torch.equal(ids, pids) and torch.equal(w, pw)


@pytest.mark.parametrize("opts", [dict(), dict(score_func="sigmoid", expert_bias=torch.linspace(-1, 1, 8)),
                                  dict(score_func="sigmoid", num_expert_groups=4, num_limited_groups=2)])
def test_partial_ids_against_a_per_row_rule(opts):
    x, gw = _layer(T=12)
    K = 3
    natural, _ = mo.moe_gating(x, gw, K, **opts)
    forced = torch.full((12, K), -1, dtype=torch.int64)
    forced[:, 1] = (natural[:, 0].long() + 1) % 8           # force a slot, sometimes to a natural pick
    forced[::3, 2] = 7
    forced[forced[:, 1] == forced[:, 2], 2] = -1
    ids, w, scores = mo.moe_gating(x, gw, K, forced_expert_ids=forced, return_scores=True, **opts)
    logits = x @ gw.t()
    ref_scores = torch.sigmoid(logits) if opts.get("score_func") == "sigmoid" else torch.softmax(logits, -1)
    G = opts.get("num_expert_groups", 1)
    order = rank_experts(ref_scores, opts.get("expert_bias"), G, opts.get("num_limited_groups", G), "top2_sum")
    for t in range(12):
        row = forced[t].tolist()
        free = [e for e in order[t].tolist() if e not in row]
        want = [e if e >= 0 else free.pop(0) for e in row]
        assert ids[t].tolist() == want
    torch.testing.assert_close(w, ref_scores.gather(1, ids.long()))   # weights from the fresh scores


def test_partial_ids_keep_the_router_gradient():
    x, gw = _layer()
    gw.requires_grad_()
    forced = torch.tensor([[2, -1]] * 8)
    _, w = mo.moe_gating(x, gw, 2, forced_expert_ids=forced)
    w.sum().backward()
    assert gw.grad is not None and gw.grad.abs().sum() > 0


def test_bad_partial_ids():
    x, gw = _layer()
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\) or be -1"):
        mo.moe_gating(x, gw, 2, forced_expert_ids=torch.tensor([[-2, 1]] * 8))
    with pytest.raises(ValueError, match="must not repeat an expert"):
        mo.moe_gating(x, gw, 3, forced_expert_ids=torch.tensor([[1, -1, 1]] * 8))
    ids, _ = mo.moe_gating(x, gw, 3, forced_expert_ids=torch.tensor([[-1, 1, -1]] * 8))   # -1 may repeat
    assert (ids[:, 1] == 1).all() and (ids != -1).all()


def test_a_backend_without_partial_replay_declines_it():
    if not mo.available_backends().get("triton", {}).get("available"):
        pytest.skip("triton backend unavailable")
    x, gw = _layer()
    forced = torch.tensor([[3, -1]] * 8)
    with mo.strict(), pytest.raises(mo.StrictFallbackError, match="partial_replay"):
        mo.moe_gating(x, gw, 2, forced_expert_ids=forced, backend="triton")
    ids, w = mo.moe_gating(x, gw, 2, forced_expert_ids=forced, backend="triton")
    assert mo.last_served("moe_gating")["served_by"] == "fallback"
    ref = gating_reference(x @ gw.t(), 2, forced_expert_ids=forced)
    assert torch.equal(ids, ref[0])
    with mo.strict():       # full ids are still served by the kernel
        mo.moe_gating(x, gw, 2, forced_expert_ids=ids, backend="triton")
    assert mo.last_served("moe_gating")["served_by"] == "kernel"
