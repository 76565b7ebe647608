"""ttx routing kernel (moe_gating) against gating_reference, in the Triton interpreter on CPU."""
import itertools

import pytest
import torch

import mojo_opset as mo
from mojo_opset.functional.gating import gating_reference_call
from ttx_helpers import gating_call, grid_randn, interpreted, reasons, run_op

pytestmark = pytest.mark.skipif(not interpreted(), reason="needs the ttx backend under the Triton interpreter")


def check_served(logits, top_k, **kw):
    call = gating_call(logits, top_k, **kw)
    with mo.strict():
        (ids, w, scores), rec = run_op(call)
    assert rec["served_by"] == "kernel", rec
    ref = gating_reference_call(call)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and scores.dtype == torch.float32
    assert torch.equal(ids, ref[0]), (ids, ref[0])
    torch.testing.assert_close(w, ref[1], rtol=1e-6, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(scores, ref[2], rtol=1e-6, atol=1e-7, equal_nan=True)
    return ids, w


GROUPS = [(1, None, "top2_sum"), (4, 2, "top2_sum"), (4, 1, "max"), (8, 3, "top2_sum"), (16, 8, "top2_sum")]


@pytest.mark.parametrize("score_func,bias,norm_scale,groups",
                         list(itertools.product(["softmax", "sigmoid"], [False, True],
                                                [(False, 1.0), (True, 2.5)], GROUPS)))
def test_options(score_func, bias, norm_scale, groups):
    g = torch.Generator().manual_seed(0)
    E, K = 16, 4
    G, L, gs = groups
    expert_bias = grid_randn(E, step=1 / 16, generator=g) * 0.1 if bias else None
    check_served(grid_randn(9, E, generator=g), K, score_func=score_func, expert_bias=expert_bias,
                 route_norm=norm_scale[0], route_scale=norm_scale[1], num_expert_groups=G,
                 num_limited_groups=L, group_score=gs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits(dtype):
    """router_dtype=None hands the kernel logits in the input dtype."""
    g = torch.Generator().manual_seed(1)
    check_served(grid_randn(6, 12, generator=g).to(dtype), 3, num_expert_groups=3, num_limited_groups=2)


def test_ties_go_to_lower_id():
    logits = torch.zeros(4, 8)
    logits[1, [2, 5, 6]] = 1.0         # three-way tie at the top
    logits[2] = torch.tensor([1., 3., 3., 1., 3., 0., 3., 1.])
    logits[3, 4:] = 2.0
    ids, _ = check_served(logits, 3)
    assert ids[0].tolist() == [0, 1, 2]
    assert ids[1].tolist() == [2, 5, 6]
    assert ids[2].tolist() == [1, 2, 4]
    assert ids[3].tolist() == [4, 5, 6]


def test_group_ties_go_to_lower_group():
    logits = torch.zeros(2, 8)
    logits[1, [0, 6]] = 1.0            # groups 0 and 3 tie; group 0 wins with one group kept
    ids, _ = check_served(logits, 2, score_func="sigmoid", num_expert_groups=4, num_limited_groups=1)
    assert ids.tolist() == [[0, 1], [0, 1]]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups", [(1, None), (4, 2)])
def test_nan_rows(score_func, groups):
    logits = grid_randn(5, 8, generator=torch.Generator().manual_seed(2))
    logits[1] = float("nan")
    logits[3, 2] = float("nan")
    logits[4] = float("inf")
    ids, w = check_served(logits, 3, score_func=score_func, num_expert_groups=groups[0],
                          num_limited_groups=groups[1], expert_bias=torch.zeros(8))
    assert ((ids >= 0) & (ids < 8)).all()
    assert ids[1].tolist() == [0, 1, 2] and torch.isnan(w[1]).all()


def test_sizes_and_edge_cases():
    g = torch.Generator().manual_seed(3)
    check_served(torch.empty(0, 8), 2)                       # T = 0
    check_served(grid_randn(1, 8, generator=g), 8)          # T = 1, K = E
    check_served(grid_randn(3, 1, generator=g), 1)          # one expert
    check_served(grid_randn(70, 40, generator=g), 6, num_expert_groups=5, num_limited_groups=2,
                 score_func="sigmoid", route_norm=True)    # several row tiles, non power-of-2 E
    check_served(grid_randn(4, 6, generator=g), 2, num_expert_groups=6, num_limited_groups=3)  # groups of one


def test_non_contiguous_logits():
    logits = grid_randn(16, 6, generator=torch.Generator().manual_seed(4)).t()
    assert not logits.is_contiguous()
    check_served(logits, 2)


def test_public_api_and_autograd():
    """The core rebuilds differentiable weights from the kernel's ids, so grad calls stay on the kernel."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 16, generator=g, requires_grad=True)
    gw = torch.randn(8, 16, generator=g, requires_grad=True)
    with mo.strict():
        ids, w = mo.moe_gating(x, gw, 2, score_func="sigmoid", route_norm=True, backend="ttx")
    assert mo.last_served("moe_gating")["served_by"] == "kernel"
    ref_ids, ref_w = mo.moe_gating(x, gw, 2, score_func="sigmoid", route_norm=True, backend="torch")
    assert torch.equal(ids, ref_ids)
    (w * torch.arange(2.0)).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    (ref_w * torch.arange(2.0)).sum().backward()
    torch.testing.assert_close(gx, x.grad)


def test_forced_ids_fall_back_with_reason():
    g = torch.Generator().manual_seed(6)
    x, gw = torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g)
    forced = torch.tensor([[5, 0]] * 5)
    ids, _ = mo.moe_gating(x, gw, 2, forced_expert_ids=forced, backend="ttx")
    rec = mo.last_served("moe_gating")
    assert rec["served_by"] == "fallback"
    assert any(r.startswith("option forced_expert_ids=") and r.endswith("is not implemented")
               for r in rec["reasons"])
    assert ids.tolist() == forced.tolist()
    with mo.strict(), pytest.raises(mo.StrictFallbackError, match="forced_expert_ids"):
        mo.moe_gating(x, gw, 2, forced_expert_ids=forced, backend="ttx")


def test_reasons_for_other_devices_and_sizes():
    from mojo_opset_ttx.gating import Gating
    impl = Gating()
    meta = gating_call(torch.empty(4, 8, device="meta"), 2)
    assert any("meta" in r for r in reasons(impl, meta))
    big = gating_call(torch.empty(2, 2048), 2)
    assert any("num_experts = 2048" in r for r in reasons(impl, big))
    assert reasons(impl, gating_call(torch.empty(2, 8), 2)) == []
