"""SPEC §3.3: grouped SwiGLU experts -- the per-expert loop, the torch._grouped_mm path and the
compile-friendly custom op agree; zero-token experts; only "swiglu" is accepted."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset.reference.experts import (can_use_grouped_mm, experts_grouped_mm, experts_loop, experts_reference)
from mojo_opset.reference.experts_op import experts_loop_op
from naive_moe import swiglu_mlp

H, I, E = 16, 8, 4


def inputs(dtype, ends=(3, 3, 7, 9), R=12, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(R, H, generator=g)
    px[ends[-1]:] = 0  # rows past the groups are padding (zero), as permute makes them
    t = [px, torch.randn(E, 2 * I, H, generator=g) * H ** -0.5, torch.randn(E, H, I, generator=g) * I ** -0.5]
    t = [a.to(dtype).requires_grad_(requires_grad) for a in t]
    return t[0], torch.tensor(ends, dtype=torch.int32), t[1], t[2]


def naive_rows(px, ends, w13, w2):
    out = torch.zeros(px.shape[0], H)
    start = 0
    for e, end in enumerate(ends.tolist()):
        for r in range(start, end):
            out[r] = swiglu_mlp(px[r], w13[e], w2[e])
        start = end
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_loop_matches_naive(dtype, tol):
    px, ends, w13, w2 = inputs(dtype)
    y = experts_loop(px, ends, w13, w2)
    assert y.dtype == dtype and y.shape == (12, H)
    torch.testing.assert_close(y.float(), naive_rows(px, ends, w13, w2), rtol=tol, atol=tol)
    assert y[9:].eq(0).all()


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is not in this torch")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("ends", [(3, 3, 7, 9), (0, 0, 5, 5), (0, 4, 4, 12), (12, 12, 12, 12)])
def test_grouped_mm_matches_loop(dtype, tol, ends):
    px, ends, w13, w2 = inputs(dtype, ends=ends, requires_grad=True)
    assert can_use_grouped_mm(px, w2)
    y_loop = experts_loop(px, ends, w13, w2)
    grad = torch.randn(y_loop.shape).to(dtype)
    g_loop = torch.autograd.grad(y_loop, (px, w13, w2), grad)
    y_gmm = experts_grouped_mm(px, ends, w13, w2)
    g_gmm = torch.autograd.grad(y_gmm, (px, w13, w2), grad)
    torch.testing.assert_close(y_gmm, y_loop, rtol=tol, atol=tol)
    assert y_gmm[int(ends[-1]):].eq(0).all()
    valid = int(ends[-1])  # gradients of padding rows are irrelevant (they map to no token)
    torch.testing.assert_close(g_gmm[0][:valid], g_loop[0][:valid], rtol=tol, atol=tol)
    for a, b in zip(g_gmm[1:], g_loop[1:]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_grouped_mm_needs_16_byte_rows():
    px, _, _, w2 = inputs(torch.bfloat16)
    assert can_use_grouped_mm(px, w2)
    assert not can_use_grouped_mm(px[:, :12], w2)          # H = 12 bf16 = 24 bytes
    assert not can_use_grouped_mm(px, w2[:, :, :4])        # I = 4 bf16 = 8 bytes


def test_zero_token_experts_cost_nothing_and_get_zero_grad():
    px, ends, w13, w2 = inputs(torch.float32, ends=(0, 5, 5, 9), requires_grad=True)
    y = experts_loop(px, ends, w13, w2)
    y.sum().backward()
    for e in (0, 2):
        assert w13.grad[e].eq(0).all() and w2.grad[e].eq(0).all()
    for e in (1, 3):
        assert w13.grad[e].abs().sum() > 0
    # an expert with no rows must not even be indexed: weights for it may be anything
    w13_nan = w13.detach().clone()
    w13_nan[0] = float("nan")
    assert torch.isfinite(experts_loop(px.detach(), ends, w13_nan, w2.detach())).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_op_matches_loop_with_gradients(dtype):
    px, ends, w13, w2 = inputs(dtype, ends=(0, 5, 5, 9), requires_grad=True)
    grad = torch.randn(12, H).to(dtype)
    y_loop = experts_loop(px, ends, w13, w2)
    g_loop = torch.autograd.grad(y_loop, (px, w13, w2), grad)
    y_op = experts_loop_op(px, ends, w13, w2)
    g_op = torch.autograd.grad(y_op, (px, w13, w2), grad)
    assert torch.equal(y_op, y_loop)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(g_op, g_loop):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_custom_op_registration_passes_opcheck():
    px, ends, w13, w2 = inputs(torch.float32, ends=(2, 2, 6, 9), requires_grad=True)
    torch.library.opcheck(torch.ops.mojo_opset.experts_loop.default, (px, ends, w13, w2))


def test_custom_op_no_rows_at_all():
    px, ends, w13, w2 = inputs(torch.float32, ends=(0, 0, 0, 0), requires_grad=True)
    y = experts_loop_op(px, ends, w13, w2)
    assert y.eq(0).all()
    y.sum().backward()
    assert w13.grad.eq(0).all() and px.grad.eq(0).all()


def test_mixed_weight_dtype_grads_keep_weight_dtype():
    px, ends, w13, w2 = inputs(torch.bfloat16, requires_grad=True)
    w2f = w2.detach().float().requires_grad_()
    for fn in (experts_loop, experts_loop_op):
        y = fn(px, ends, w13, w2f)
        g = torch.autograd.grad(y.sum(), (px, w13, w2f))
        assert [t.dtype for t in g] == [torch.bfloat16, torch.bfloat16, torch.float32]


def test_other_activation_rejected():
    px, ends, w13, w2 = inputs(torch.float32)
    with pytest.raises(ValueError, match="activation.*'swiglu'.*'gelu'"):
        experts_reference(px, ends, w13, w2, activation="gelu")
    x = torch.randn(4, H)
    with pytest.raises(ValueError, match="activation"):
        mo.moe_forward(x, torch.randn(E, H), w13, w2, 2, activation="geglu")


@pytest.mark.gpu
def test_cuda_reference_matches_loop():
    """On CUDA (Hopper, bf16) the core path is torch._grouped_mm: same results as the loop."""
    px, ends, w13, w2 = (t.cuda() for t in inputs(torch.bfloat16, ends=(0, 5, 5, 9)))
    for t in (px, w13, w2):
        t.requires_grad_()
    grad = torch.randn(12, H, device="cuda").to(torch.bfloat16)
    y_ref = experts_reference(px, ends, w13, w2)
    g_ref = torch.autograd.grad(y_ref, (px, w13, w2), grad)
    y_loop = experts_loop(px, ends, w13, w2)
    g_loop = torch.autograd.grad(y_loop, (px, w13, w2), grad)
    torch.testing.assert_close(y_ref, y_loop, rtol=2e-2, atol=2e-2)
    assert y_ref[9:].eq(0).all()
    torch.testing.assert_close(g_ref[0][:9], g_loop[0][:9], rtol=2e-2, atol=2e-2)
    for a, b in zip(g_ref[1:], g_loop[1:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
