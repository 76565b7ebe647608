"""Expert-parallel building blocks that need no process group: the expert layout, the owner map,
the byte packing of exchanged rows, and the error when no process group exists."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import mojo_opset as mo
from mojo_opset.distributed import expert_owner, expert_ranges
from mojo_opset.distributed.collectives import pack, unpack


def test_expert_ranges_examples():
    assert expert_ranges(5, 2) == [(0, 3), (3, 5)]
    assert expert_ranges(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert expert_ranges(3, 4) == [(0, 1), (1, 2), (2, 3), (3, 3)]
    assert expert_ranges(8, 1) == [(0, 8)]
    with pytest.raises(ValueError, match="world_size"):
        expert_ranges(4, 0)


@settings(max_examples=60, deadline=None)
@given(E=st.integers(1, 300), W=st.integers(1, 20))
def test_layout_and_owner_agree(E, W):
    ranges = expert_ranges(E, W)
    sizes = [hi - lo for lo, hi in ranges]
    assert ranges[0][0] == 0 and ranges[-1][1] == E
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))       # contiguous
    assert sizes == [E // W + 1] * (E % W) + [E // W] * (W - E % W)
    owner = expert_owner(torch.arange(E, dtype=torch.int32), E, W)
    want = torch.tensor([r for r, (lo, hi) in enumerate(ranges) for _ in range(lo, hi)])
    assert torch.equal(owner, want)


def test_pack_round_trip():
    x = torch.randn(3, 5, dtype=torch.bfloat16)
    w = torch.rand(3, 2)
    ids = torch.randint(-1, 9, (3, 2), dtype=torch.int32)
    buf = pack(x, w, ids)
    assert buf.dtype == torch.uint8 and buf.shape == (3, 5 * 2 + 2 * 4 + 2 * 4)
    x2, w2, ids2 = unpack(buf, ((x.dtype, 5), (w.dtype, 2), (ids.dtype, 2)))
    assert torch.equal(x2, x) and torch.equal(w2, w) and torch.equal(ids2, ids)
    empty = unpack(pack(x[:0], w[:0]), ((x.dtype, 5), (w.dtype, 2)))
    assert [t.shape for t in empty] == [(0, 5), (0, 2)]


def test_ep_group_without_process_group_is_a_clear_error():
    assert not torch.distributed.is_initialized()
    x, gw = torch.randn(4, 8), torch.randn(4, 8)
    w13, w2 = torch.randn(2, 6, 8), torch.randn(2, 8, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        mo.moe_forward(x, gw, w13, w2, 2, ep_group=object())
