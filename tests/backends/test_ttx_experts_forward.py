"""ttx grouped SwiGLU experts kernel and the end-to-end MoE forward, in the Triton interpreter on CPU."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset.contract import ExpertsCall
from mojo_opset.reference.experts import experts_loop
from mojo_opset.reference.permute import permute_reference
from ttx_helpers import TOL, expert_weights, interpreted, random_ids, reasons, run_op

pytestmark = pytest.mark.skipif(not interpreted(), reason="needs the ttx backend under the Triton interpreter")


def check_experts(px, ends, w13, w2):
    with mo.strict():
        y, rec = run_op(ExpertsCall(permuted_x=px, group_ends=ends, w13=w13, w2=w2, activation="swiglu"))
    assert rec["served_by"] == "kernel", rec
    ref = experts_loop(px, ends, w13, w2)
    assert y.dtype == px.dtype and y.shape == ref.shape
    torch.testing.assert_close(y, ref, **TOL[px.dtype])
    valid = int(ends[-1]) if ends.numel() else 0
    assert (y[valid:] == 0).all()
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("align", [1, 8])
def test_experts(dtype, align):
    g = torch.Generator().manual_seed(20)
    T, E, K, H, I = 13, 5, 2, 40, 24      # sizes that are not multiples of the tiles
    x = torch.randn(T, H, generator=g).to(dtype)
    px, _, ends, _, _ = permute_reference(x, random_ids(T, E, K, generator=g), E, align)
    check_experts(px, ends, *expert_weights(E, H, I, dtype, generator=g))


def test_experts_empty_and_skewed_groups():
    g = torch.Generator().manual_seed(21)
    E, H, I = 4, 32, 16
    w13, w2 = expert_weights(E, H, I, torch.float16, generator=g)
    x = torch.randn(20, H, generator=g).half()
    # all rows to expert 2 (experts 0, 1, 3 empty), with padding rows past the last group
    px, _, ends, _, _ = permute_reference(x, torch.full((20, 1), 2, dtype=torch.int32), E, 16)
    check_experts(px, ends, w13, w2)
    check_experts(px[:0], torch.zeros(E, dtype=torch.int32), w13, w2)              # no rows


def test_experts_weights_in_another_dtype():
    """Weights stored in fp32 with fp16 activations are rounded to fp16 first, as the reference does."""
    g = torch.Generator().manual_seed(22)
    x = torch.randn(9, 32, generator=g).half()
    px, _, ends, _, _ = permute_reference(x, random_ids(9, 3, 2, generator=g), 3, 1)
    check_experts(px, ends, *expert_weights(3, 32, 16, torch.float32, generator=g))


def test_experts_decline_non_contiguous_weights():
    g = torch.Generator().manual_seed(23)
    E, H, I = 3, 16, 16
    w13, w2 = expert_weights(E, H, I, torch.float32, generator=g)
    w2t = w2.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    x = torch.randn(5, H, generator=g)
    px, _, ends, _, _ = permute_reference(x, random_ids(5, E, 2, generator=g), E, 1)
    y, rec = run_op(ExpertsCall(permuted_x=px, group_ends=ends, w13=w13, w2=w2t, activation="swiglu"))
    assert rec["served_by"] == "fallback"
    assert any("w2 is not contiguous" in r for r in rec["reasons"])
    torch.testing.assert_close(y, experts_loop(px, ends, w13, w2))


def test_experts_reasons_for_activation():
    from mojo_opset_ttx.experts import Experts
    x = torch.empty(4, 8)
    w13, w2 = torch.empty(2, 8, 8), torch.empty(2, 8, 4)
    ends = torch.zeros(2, dtype=torch.int32)
    got = reasons(Experts(), ExpertsCall(permuted_x=x, group_ends=ends, w13=w13, w2=w2, activation="gelu"))
    assert any("option activation='gelu' is not implemented" in r for r in got)
    assert reasons(Experts(), ExpertsCall(permuted_x=x, group_ends=ends, w13=w13, w2=w2, activation="swiglu")) == []


def make_moe(T, E, H, I, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    gate = torch.randn(E, H, generator=g).to(dtype)
    return x, gate, *expert_weights(E, H, I, dtype, generator=g)


SUBOPS = ("moe_gating", "moe_permute", "moe_experts", "moe_combine")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("routing", [dict(), dict(score_func="sigmoid", num_expert_groups=4, num_limited_groups=2,
                                                  route_norm=True, route_scale=2.5, expert_bias="random")])
def test_moe_forward_end_to_end(dtype, routing):
    x, gate, w13, w2 = make_moe(11, 8, 32, 16, dtype, seed=30)
    routing = dict(routing)
    if routing.get("expert_bias") == "random":
        routing["expert_bias"] = torch.linspace(-0.05, 0.05, 8)
    with mo.strict():
        y, info = mo.moe_forward(x, gate, w13, w2, 2, backend="ttx", return_router_info=True, **routing)
    for op in SUBOPS:
        assert mo.last_served(op)["served_by"] == "kernel", (op, mo.last_served(op))
    ref, ref_info = mo.moe_forward(x, gate, w13, w2, 2, backend="torch", return_router_info=True, **routing)
    assert torch.equal(info["topk_ids"], ref_info["topk_ids"])
    torch.testing.assert_close(y, ref, **TOL[dtype])


def test_moe_forward_edge_sizes():
    x, gate, w13, w2 = make_moe(4, 4, 32, 16, torch.float32, seed=31)
    with mo.strict():
        y0 = mo.moe_forward(x[:0], gate, w13, w2, 2, backend="ttx")                           # T = 0
        y1 = mo.moe_forward(x[:1], gate, w13, w2, 2, backend="ttx")                           # T = 1
        xs = x[:, None, :].expand(4, 3, 32)                                                   # non-contiguous
        ys = mo.moe_forward(xs, gate, w13, w2, 4, backend="ttx")                              # K = E
    assert y0.shape == (0, 32)
    torch.testing.assert_close(y1, mo.moe_forward(x[:1], gate, w13, w2, 2, backend="torch"), **TOL[torch.float32])
    torch.testing.assert_close(ys, mo.moe_forward(xs, gate, w13, w2, 4, backend="torch"), **TOL[torch.float32])


def test_moe_forward_with_grad_falls_back_where_no_backward():
    x, gate, w13, w2 = make_moe(6, 4, 16, 16, torch.float32, seed=32)
    w13.requires_grad_()
    y = mo.moe_forward(x, gate, w13, w2, 2, backend="ttx")
    # x needs no grad: routing and permute stay on the kernels; experts and combine carry grad
    assert mo.last_served("moe_gating")["served_by"] == "kernel"
    assert mo.last_served("moe_permute")["served_by"] == "kernel"
    for op in ("moe_experts", "moe_combine"):
        rec = mo.last_served(op)
        assert rec["served_by"] == "fallback" and rec["backend"] == "ttx", (op, rec)
        assert "autograd: this implementation has no backward" in rec["reasons"]
    y.sum().backward()
    w13_ref = w13.detach().clone().requires_grad_()
    mo.moe_forward(x, gate, w13_ref, w2, 2, backend="torch").sum().backward()
    torch.testing.assert_close(w13.grad, w13_ref.grad)

    xg = x.clone().requires_grad_()
    mo.moe_forward(xg, gate, w13.detach(), w2, 2, backend="ttx").sum().backward()
    assert mo.last_served("moe_gating")["served_by"] == "kernel"  # the core rebuilds the weights' graph
    assert mo.last_served("moe_permute")["served_by"] == "fallback"
    x_ref = x.clone().requires_grad_()
    mo.moe_forward(x_ref, gate, w13.detach(), w2, 2, backend="torch").sum().backward()
    torch.testing.assert_close(xg.grad, x_ref.grad)
    with mo.strict(), pytest.raises(mo.StrictFallbackError, match="no backward"):
        mo.moe_forward(x, gate, w13, w2, 2, backend="ttx")
