"""The triton backend's align step (expert-sorted, block-aligned rows) against a plain Python
sort, on both of its paths (one program for decode sizes, three launches beyond), with ids out of
range (never placed) and padding rows (-1); in the interpreter on CPU, on the GPU when there is one."""
import pytest
import torch

import mojo_opset as mo

pytestmark = pytest.mark.skipif(not mo.available_backends().get("triton", {}).get("available"),
                                reason="triton backend unavailable")


def _naive(ids, E, align, rows, block_m):
    flat = ids.reshape(-1).tolist()
    tpe = [sum(1 for e in flat if e == x) for x in range(E)]
    row_src, ends, pair_row = [], [], [-1] * len(flat)
    for x in range(E):
        for p, e in enumerate(flat):
            if e == x:
                pair_row[p] = len(row_src)
                row_src.append(p)
        row_src += [-1] * ((-len(row_src)) % align)
        ends.append(len(row_src))
    used = len(row_src)
    row_src += [-1] * (rows - used)
    blocks = [sum(1 for end in ends if end <= b * block_m) if b * block_m < used else -1
              for b in range(rows // block_m)]
    return tpe, ends, row_src, pair_row, blocks


CASES = [(1, 8, 256, 16), (16, 8, 128, 16), (16, 8, 256, 16), (5, 2, 8, 16), (64, 8, 128, 32), (300, 2, 8, 64)]


@pytest.mark.parametrize("T,K,E,bm", CASES)
def test_align_pairs_matches_a_plain_sort(T, K, E, bm):
    _check(T, K, E, bm, "cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("T,K,E,bm", CASES + [(32, 8, 256, 16), (512, 8, 256, 64), (4096, 2, 8, 128),
                                       (8192, 8, 256, 64)])
def test_gpu_align_pairs_matches_a_plain_sort(T, K, E, bm):
    """The compiled kernels: the one-program path's barrier between the padding rows and the pairs'
    rows, its many-warp tiles, and the three-launch path."""
    _check(T, K, E, bm, "cuda")


def _check(T, K, E, bm, dev):
    from mojo_opset_triton.align_kernel import align_pairs, gemm_rows

    g = torch.Generator().manual_seed(T * 1000 + E)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    ids[0, 0] = -1                      # an id out of range (expert parallelism) is never placed
    if T > 1:
        ids[1, K - 1] = E + 3
    rows = gemm_rows(T * K, E, bm)
    got = align_pairs(ids.to(dev), E, bm, rows, bm)
    want = _naive(ids, E, bm, rows, bm)
    for name, a, b in zip(("tokens_per_expert", "group_ends", "row_src", "pair_row", "block_expert"), got, want):
        assert a.cpu().tolist() == b, name


@pytest.mark.parametrize("max_chunks", [1, 3])
@pytest.mark.parametrize("T,K,E,bm", [(300, 2, 8, 64), (64, 8, 128, 32)])
def test_chunks_of_several_tiles_match_a_plain_sort(monkeypatch, max_chunks, T, K, E, bm):
    """Few chunks of several tiles each (what large inputs get): the scatter carries each expert's
    running count from tile to tile."""
    from mojo_opset_triton import align_kernel

    monkeypatch.setattr(align_kernel, "MAX_CHUNKS", max_chunks)
    monkeypatch.setattr(align_kernel, "SMALL_TILE", 0)        # the three-launch path at these sizes
    _check(T, K, E, bm, "cuda" if torch.cuda.is_available() else "cpu")
