"""SPEC §3.2: the reference permute -- stable order, alignment padding, index maps, no host sync."""
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from mojo_opset.reference.experts import experts_loop
from mojo_opset.reference.permute import padded_rows, permute_reference

ALIGNS = (1, 8, 16, 32, 64, 128)


def naive_permute(x, ids, E, align):
    """Python lists: pairs grouped by expert in flat-pair order, each group padded to ``align``."""
    T, K = ids.shape
    row_src, ends, counts = [], [], []
    for e in range(E):
        pairs = [p for p in range(T * K) if int(ids.view(-1)[p]) == e]
        counts.append(len(pairs))
        row_src += pairs + [-1] * ((-len(pairs)) % align)
        ends.append(len(row_src))
    R = padded_rows(T * K, E, align)
    row_src += [-1] * (R - len(row_src))
    permuted = torch.stack([x[p // K] if p >= 0 else torch.zeros_like(x[0]) for p in row_src]) if R else x[:0]
    pair_row = [row_src.index(p) for p in range(T * K)]
    return permuted, counts, ends, row_src, pair_row


def test_hand_case_align_1():
    x = torch.arange(3 * 2, dtype=torch.float32).view(3, 2)
    ids = torch.tensor([[2, 0], [0, 1], [1, 2]], dtype=torch.int32)  # expert 3 gets no token
    px, tpe, ends, row_src, pair_row = permute_reference(x, ids, 4, 1)
    assert tpe.tolist() == [2, 2, 2, 0]
    assert ends.tolist() == [2, 4, 6, 6]
    assert row_src.tolist() == [1, 2, 3, 4, 0, 5]
    assert pair_row.tolist() == [4, 0, 1, 2, 3, 5]
    assert torch.equal(px, x[[0, 1, 1, 2, 0, 2]])
    for t in (tpe, ends, row_src, pair_row):
        assert t.dtype == torch.int32


def test_hand_case_align_8():
    x = torch.arange(3 * 2, dtype=torch.float32).view(3, 2) + 1
    ids = torch.tensor([[2, 0], [0, 1], [1, 2]], dtype=torch.int32)
    px, tpe, ends, row_src, pair_row = permute_reference(x, ids, 4, 8)
    assert px.shape == (6 + 4 * 7, 2)  # worst case T*K + E*(align-1)
    assert tpe.tolist() == [2, 2, 2, 0]
    assert ends.tolist() == [8, 16, 24, 24]
    assert row_src.tolist() == [1, 2] + [-1] * 6 + [3, 4] + [-1] * 6 + [0, 5] + [-1] * 16
    assert pair_row.tolist() == [16, 0, 1, 8, 9, 17]
    pad = row_src < 0
    assert px[pad].eq(0).all()
    assert torch.equal(px[~pad], x[[0, 1, 1, 2, 0, 2]])


@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("T,K,E", [(7, 2, 5), (16, 3, 8), (1, 1, 3), (5, 4, 4)])
def test_matches_naive(align, T, K, E):
    g = torch.Generator().manual_seed(T * 100 + K * 10 + E)
    # distinct experts per row, with the last expert never used
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)]) if K < E else \
        torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids = ids.to(torch.int32)
    x = torch.randn(T, 6, generator=g)
    px, tpe, ends, row_src, pair_row = permute_reference(x, ids, E, align)
    want_px, counts, want_ends, want_src, want_pair = naive_permute(x, ids, E, align)
    assert px.shape[0] == padded_rows(T * K, E, align)
    assert tpe.tolist() == counts
    assert ends.tolist() == want_ends
    assert row_src.tolist() == want_src
    assert pair_row.tolist() == want_pair
    assert torch.equal(px, want_px)
    # group starts are multiples of align; pair_row and row_src are inverse maps
    starts = torch.cat([torch.zeros(1, dtype=torch.int32), ends[:-1]])
    assert (starts % align == 0).all()
    assert torch.equal(row_src[pair_row.long()], torch.arange(T * K, dtype=torch.int32))
    real = (row_src >= 0).nonzero().view(-1)
    assert torch.equal(pair_row[row_src[real].long()].long(), real)
    assert int(tpe.sum()) == T * K


def test_stable_in_token_then_slot():
    ids = torch.tensor([[1, 0], [0, 1], [1, 0]], dtype=torch.int32)
    _, _, _, row_src, _ = permute_reference(torch.zeros(3, 1), ids, 2, 1)
    # expert 0: pairs (t0,j1)=1, (t1,j0)=2, (t2,j1)=5 ; expert 1: 0, 3, 4
    assert row_src.tolist() == [1, 2, 5, 0, 3, 4]


@pytest.mark.parametrize("align", ALIGNS)
def test_no_tokens(align):
    px, tpe, ends, row_src, pair_row = permute_reference(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.int32), 3,
                                                         align)
    R = 3 * (align - 1)
    assert px.shape == (R, 4) and px.eq(0).all()
    assert tpe.tolist() == [0, 0, 0] and ends.tolist() == [0, 0, 0]
    assert row_src.tolist() == [-1] * R and pair_row.shape == (0,)


def test_gradient_flows_back_to_tokens():
    x = torch.randn(4, 3, requires_grad=True)
    ids = torch.tensor([[0, 2], [2, 1], [1, 0], [0, 1]], dtype=torch.int32)
    px, *_ = permute_reference(x, ids, 3, 16)
    (px * torch.arange(px.shape[0], dtype=torch.float32)[:, None]).sum().backward()
    _, _, _, row_src, _ = permute_reference(x.detach(), ids, 3, 16)
    want = torch.zeros(4)
    for r, p in enumerate(row_src.tolist()):
        if p >= 0:
            want[p // 2] += r
    torch.testing.assert_close(x.grad, want[:, None].expand(4, 3))


@pytest.mark.parametrize("align", [1, 16])
def test_no_host_sync(align):
    """Under FakeTensorMode a tensor has no values: any .item()/.tolist()/nonzero/bool() raises."""
    with FakeTensorMode():
        x = torch.empty(37, 8)
        ids = torch.empty(37, 4, dtype=torch.int32)
        px, tpe, ends, row_src, pair_row = permute_reference(x, ids, 6, align)
    assert px.shape == (padded_rows(148, 6, align), 8)
    assert tpe.shape == ends.shape == (6,)
    assert row_src.shape == (px.shape[0],) and pair_row.shape == (148,)


def test_fake_mode_detects_host_sync():
    """The check above is meaningful: the expert loop reads group sizes on the host and fails there."""
    with FakeTensorMode():
        px = torch.empty(8, 4)
        ends = torch.empty(2, dtype=torch.int32)
        with pytest.raises(DataDependentOutputException):
            experts_loop(px, ends, torch.empty(2, 6, 4), torch.empty(2, 4, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("align", [1, 16])
def test_no_host_sync_on_cuda(align):
    """CUDA's sync debug mode turns any device-to-host synchronisation into an error."""
    import mojo_opset as mo

    x = torch.randn(64, 32, device="cuda")
    gw = torch.randn(8, 32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids, w = mo.moe_gating(x, gw, 4, score_func="sigmoid", num_expert_groups=4, num_limited_groups=2,
                               expert_bias=torch.zeros(8, device="cuda"), backend="torch")
        outs = permute_reference(x, ids, 8, align)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = permute_reference(x.cpu(), ids.cpu(), 8, align)
    for a, b in zip(outs, ref):
        assert torch.equal(a.cpu(), b)
