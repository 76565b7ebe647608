"""SPEC §3.4: combine = per-token weighted sum of its expert rows, fp32 accumulation, x's dtype out."""
import pytest
import torch

from mojo_opset.reference.combine import combine_reference
from mojo_opset.reference.permute import permute_reference


def naive_combine(expert_out, pair_row, w, T):
    K = w.shape[1]
    out = torch.zeros(T, expert_out.shape[1])
    for t in range(T):
        for j in range(K):
            out[t] += w[t, j].float() * expert_out[int(pair_row[t * K + j])].float()
    return out


def test_hand_case():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [5.0, -1.0]])
    pair_row = torch.tensor([2, 0, 3, 1], dtype=torch.int32)  # token 0 -> rows 2, 0 ; token 1 -> rows 3, 1
    w = torch.tensor([[0.5, 0.25], [1.0, -2.0]])
    out = combine_reference(rows, pair_row, w, 2)
    assert torch.equal(out, torch.tensor([[1.25, 1.0], [5.0, -3.0]]))


def test_accumulates_in_fp32():
    # bf16: 1 + 2^-8 + 2^-8 is 1 + 2^-7 exactly in fp32, but 1.0 when each partial sum is rounded to bf16
    rows = torch.tensor([[1.0], [2.0 ** -8], [2.0 ** -8]], dtype=torch.bfloat16)
    out = combine_reference(rows, torch.tensor([0, 1, 2], dtype=torch.int32), torch.ones(1, 3), 1)
    assert out.dtype == torch.bfloat16
    assert out.item() == 1.0 + 2.0 ** -7


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("align", [1, 16])
def test_matches_naive_with_gradients(dtype, tol, align):
    g = torch.Generator().manual_seed(align)
    T, K, E, Hd = 9, 3, 5, 8
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    _, _, _, _, pair_row = permute_reference(torch.zeros(T, Hd), ids, E, align)
    R = pair_row.max().item() + 5
    y = torch.randn(R, Hd, generator=g).to(dtype).requires_grad_()
    w = torch.rand(T, K, generator=g).requires_grad_()
    out = combine_reference(y, pair_row, w, T)
    assert out.dtype == dtype and out.shape == (T, Hd)
    yr, wr = y.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    ref = naive_combine(yr, pair_row, wr, T)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    grad = torch.randn(T, Hd, generator=g)
    out.backward(grad.to(dtype))
    ref.backward(grad.to(dtype).float())
    torch.testing.assert_close(y.grad.float(), yr.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad, wr.grad, rtol=tol, atol=tol)
    unused = torch.ones(R, dtype=torch.bool)
    unused[pair_row.long()] = False
    assert y.grad[unused].eq(0).all()


def test_no_tokens():
    out = combine_reference(torch.zeros(16, 4), torch.zeros(0, dtype=torch.int32), torch.zeros(0, 2), 0)
    assert out.shape == (0, 4)
