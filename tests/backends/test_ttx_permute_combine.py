"""ttx permute and combine kernels against the reference, in the Triton interpreter on CPU."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset.contract import CombineCall, PermuteCall
from mojo_opset.reference.combine import combine_reference
from mojo_opset.reference.permute import permute_reference
from ttx_helpers import interpreted, random_ids, reasons, run_op

pytestmark = pytest.mark.skipif(not interpreted(), reason="needs the ttx backend under the Triton interpreter")


def check_permute(x, ids, E, align):
    with mo.strict():
        out, rec = run_op(PermuteCall(x=x, topk_ids=ids, num_experts=E, align=align))
    assert rec["served_by"] == "kernel", rec
    ref = permute_reference(x, ids, E, align)
    names = ("permuted_x", "tokens_per_expert", "group_ends", "row_src", "pair_row")
    for name, a, b in zip(names, out, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), name   # a copy and an index map: exact, padding included
    return out


@pytest.mark.parametrize("align", [1, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_permute_random(align, dtype):
    g = torch.Generator().manual_seed(align)
    T, E, K, H = 37, 8, 3, 20
    x = torch.randn(T, H, generator=g).to(dtype)
    check_permute(x, random_ids(T, E, K, generator=g), E, align)


@pytest.mark.parametrize("align", [1, 8, 16])
def test_permute_edge_cases(align):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 12, generator=g)
    check_permute(x[:0], torch.empty(0, 2, dtype=torch.int32), 4, align)              # T = 0
    check_permute(x[:1], torch.tensor([[2, 0]], dtype=torch.int32), 4, align)         # T = 1
    out = check_permute(x, torch.full((9, 1), 3, dtype=torch.int32), 5, align)        # all to one expert
    assert out[1].tolist() == [0, 0, 0, 9, 0]
    # many chunks: stability across chunk boundaries with heavily repeated experts
    check_permute(torch.randn(300, 8, generator=g), random_ids(300, 3, 2, generator=g), 3, align)
    # enough pairs for chunks of several sub-blocks
    check_permute(torch.randn(1100, 4, generator=g), random_ids(1100, 3, 2, generator=g), 3, align)


def test_permute_non_contiguous_inputs():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(10, 32, generator=g)[:, ::2]
    ids = random_ids(10, 6, 4, generator=g).t().contiguous().t()
    assert not x.is_contiguous() and not ids.is_contiguous()
    check_permute(x, ids, 6, 8)


def test_permute_int64_ids():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 8, generator=g)
    ids = random_ids(6, 4, 2, generator=g)
    with mo.strict():
        out, _ = run_op(PermuteCall(x=x, topk_ids=ids.long(), num_experts=4, align=1))
    assert torch.equal(out[0], permute_reference(x, ids, 4, 1)[0])


def check_combine(y, pair_row, w, T):
    with mo.strict():
        out, rec = run_op(CombineCall(expert_out=y, pair_row=pair_row, topk_weights=w, num_tokens=T))
    assert rec["served_by"] == "kernel", rec
    ref = combine_reference(y, pair_row, w, T)
    assert out.dtype == y.dtype and out.shape == ref.shape
    # fp32 accumulation in both; the final rounding may differ by one unit in the last place
    # (the interpreter's bf16 conversion does not round to nearest)
    tol = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
           torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}[y.dtype]
    torch.testing.assert_close(out, ref, equal_nan=True, **tol)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("align", [1, 16])
def test_combine(dtype, align):
    g = torch.Generator().manual_seed(10)
    T, E, K, H = 21, 6, 3, 72
    x = torch.randn(T, H, generator=g).to(dtype)
    _, _, _, _, pair_row = permute_reference(x, random_ids(T, E, K, generator=g), E, align)
    y = torch.randn(pair_row.numel() + E * (align - 1), H, generator=g).to(dtype)
    check_combine(y, pair_row, torch.rand(T, K, generator=g), T)


def test_combine_edge_cases():
    g = torch.Generator().manual_seed(11)
    check_combine(torch.empty(0, 8), torch.empty(0, dtype=torch.int32), torch.empty(0, 2), 0)   # T = 0
    y = torch.randn(2, 8, generator=g)
    check_combine(y, torch.tensor([1, 0], dtype=torch.int32), torch.tensor([[0.25, 0.75]]), 1)  # T = 1
    w = torch.rand(4, 2, generator=g)
    w[2, 1] = float("nan")                                     # a NaN routing weight reaches its token only
    out = check_combine(torch.randn(8, 8, generator=g), torch.arange(8, dtype=torch.int32), w, 4)
    assert torch.isnan(out[2]).all() and not torch.isnan(out[[0, 1, 3]]).any()
    yt = torch.randn(16, 6, generator=g).t()                     # non-contiguous expert output
    check_combine(yt, torch.randperm(6, generator=g).to(torch.int32), torch.rand(3, 2, generator=g), 3)


def test_combine_is_deterministic():
    g = torch.Generator().manual_seed(12)
    y = torch.randn(40, 24, generator=g)
    pair_row = torch.randperm(40, generator=g).to(torch.int32)
    w = torch.rand(10, 4, generator=g)
    with mo.strict():
        a, _ = run_op(CombineCall(expert_out=y, pair_row=pair_row, topk_weights=w, num_tokens=10))
        b, _ = run_op(CombineCall(expert_out=y, pair_row=pair_row, topk_weights=w, num_tokens=10))
    assert torch.equal(a, b)


def test_permute_reasons():
    from mojo_opset_ttx.permute import Permute
    impl = Permute()
    ok = dict(x=torch.empty(4, 8), topk_ids=torch.zeros(4, 2, dtype=torch.int32), num_experts=4, align=16)
    assert reasons(impl, PermuteCall(**ok)) == []
    assert any("meta" in r for r in reasons(impl, PermuteCall(**{**ok, "x": torch.empty(4, 8, device="meta")})))
    assert any("num_experts = 8192" in r for r in reasons(impl, PermuteCall(**{**ok, "num_experts": 8192})))
    many = torch.empty(2**23, 2, dtype=torch.int32, device="meta")   # 2**24 pairs, no memory
    assert any("2**24 pairs" in r for r in reasons(impl, PermuteCall(**{**ok, "topk_ids": many})))
    assert any("float64" in r
               for r in reasons(impl, PermuteCall(**{**ok, "x": torch.empty(4, 8, dtype=torch.float64)})))
