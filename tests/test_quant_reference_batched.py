"""The batched quantized-experts reference (no per-expert loop, no host read of the group sizes)
against the per-expert formulation it replaced, kept here as a private oracle: bit-identical on the
CPU for every scheme, with and without activation smoothing, in both modes and every activation
dtype; plus the tile plan it runs on."""
import pytest
import torch
import torch.nn.functional as F

import mojo_opset as mo
from mojo_opset.quant import grouped, reference
from mojo_opset.quant.activations import quantize_tokens_fp8, quantize_tokens_int8
from mojo_opset.quant.int4 import unpack_int4
from mojo_opset.quant.reference import quant_experts_rows
from mojo_opset.quant.weights import dequantize_weight
from mojo_opset.reference import invariant
from mojo_opset.reference.swiglu import swiglu

SCHEMES = ("w8a8_int8", "w4a8_int4", "w8a8_fp8_block", "w8a16_int8", "w4a16_int4")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- the per-expert oracle

def _old_int_sums(a, b, group, bound):
    """Exact int64 [M, N, G] in row chunks: fp32 bmm over K-chunks below 2**24, chunks summed in int64."""
    M, K = a.shape
    N, G = b.shape[0], K // group
    c = min(group, ((1 << 24) - 1) // bound)
    S = -(-group // c)
    bf = F.pad(b.float().reshape(N, G, group), (0, S * c - group)).reshape(N, G * S, c).transpose(0, 1)
    out = torch.empty(M, N, G, dtype=torch.int64, device=a.device)
    step = max(1, (1 << 22) // (N * G * S))
    for m0 in range(0, M, step):
        af = F.pad(a[m0:m0 + step].float().reshape(-1, G, group), (0, S * c - group)).reshape(-1, G * S, c)
        part = torch.bmm(af.transpose(0, 1), bf.transpose(1, 2))
        out[m0:m0 + step] = part.to(torch.int64).reshape(G, S, -1, N).sum(1).permute(1, 2, 0)
    return out


def _gsum(t, det):
    return invariant.last_dim_sum(t) if det else t.sum(-1)


def _old_fp8(xq, sx, wq, sw, det):
    M, Kp = xq.shape
    N, K = wq.shape
    KB = Kp // 128
    wf = F.pad(wq.double(), (0, Kp - K)).reshape(N, KB, 128).transpose(0, 1)
    sw_rows = sw.double().repeat_interleave(128, dim=0)[:N]
    y = torch.empty(M, N, device=xq.device)
    step = max(1, (1 << 22) // (N * KB))
    for m0 in range(0, M, step):
        xf = xq[m0:m0 + step].double().reshape(-1, KB, 128).transpose(0, 1)
        acc = torch.bmm(xf, wf.transpose(1, 2)).permute(1, 2, 0)
        y[m0:m0 + step] = _gsum(acc * sx[m0:m0 + step].double().unsqueeze(1) * sw_rows, det).float()
    return y


def _old_linear(x, fmt, act, q, s, group, det):
    if act is None:
        return (invariant.linear if det else F.linear)(x, dequantize_weight(fmt, q, s, group).to(x.dtype))
    if act == "fp8":
        return _old_fp8(*quantize_tokens_fp8(x), q, s, det).to(x.dtype)
    xq, sx = quantize_tokens_int8(x)
    if fmt == "int8":
        return (_old_int_sums(xq, q, xq.shape[1], 127 * 128)[..., 0].float() * sx.unsqueeze(-1) * s).to(x.dtype)
    acc = _old_int_sums(xq, unpack_int4(q), group, 127 * 8)
    return (_gsum(acc.float() * s, det) * sx.unsqueeze(-1)).to(x.dtype)


def old_rows(px, group_ends, qe, det=False):
    """The per-expert loop (reads the group sizes on the host), as the reference was."""
    info, dt = qe.info, px.dtype
    y = torch.zeros_like(px)
    start = 0
    for e, end in enumerate(group_ends.tolist()):
        if end > start:
            q13, s13, q2, s2 = qe.expert_weights(e)
            m13, m2 = qe.expert_smoothing(e)

            def project(v, q, s, m):
                if m is not None:
                    v = v.float() * m
                    if info.activation is None:
                        v = v.to(dt)
                return _old_linear(v, info.weight, info.activation, q, s, qe.group_size, det).to(dt)

            a = swiglu(project(px[start:end], q13, s13, m13), dt)
            y[start:end] = project(a, q2, s2, m2)
        start = end
    return y


# --------------------------------------------------------------------------- cases

def _case(scheme, sizes, H=256, I=128, extra=3, smooth=False, dtype=torch.float32, group=None, seed=0):
    """Weights, expert-sorted rows (``extra`` rows past the groups) and group ends (int32)."""
    g = torch.Generator().manual_seed(seed)
    E = len(sizes)
    w13 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    q = mo.quantize_experts(w13, w2, scheme, group_size=group)
    if smooth:
        q = type(q).from_tensors(scheme, q.w13_q, q.w13_scale, q.w2_q, q.w2_scale, q.group_size,
                                 w13_smooth=torch.rand(E, H, generator=g) + 0.5,
                                 w2_smooth=torch.rand(E, I, generator=g) + 0.5)
    R = sum(sizes) + extra
    x = (torch.randn(R, H, generator=g) * 2).to(dtype)
    ends = torch.tensor(sizes).cumsum(0).to(torch.int32)
    return x, ends, q


SIZES = (5, 0, 1, 17, 0, 9)        # empty groups, a single row, groups over and under a tile


def _same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.view(torch.uint8 if got.dtype == torch.float8_e4m3fn else got.dtype), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bit_identical_to_the_per_expert_loop(scheme, smooth, dtype):
    x, ends, q = _case(scheme, SIZES, smooth=smooth, dtype=dtype)
    for det in (False, True):
        got = quant_experts_rows(x, ends, q, deterministic=det)
        _same(got, old_rows(x, ends, q, det))
        assert not got[int(ends[-1]):].any()          # rows past the groups are zero


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bit_identical_in_small_chunks(scheme, monkeypatch):
    """Many chunks of tiles (and of experts on the a16 grouped path) give the same bits."""
    monkeypatch.setattr(grouped, "BUDGET", 1 << 12)
    monkeypatch.setattr(reference, "BUDGET", 1 << 12)
    monkeypatch.setattr(reference, "DEQUANT_BUDGET", 2 * 256 * 128 * 2)      # two experts' w13 at a time
    x, ends, q = _case(scheme, SIZES, smooth=True, dtype=torch.bfloat16, seed=1)
    for det in (False, True):
        _same(quant_experts_rows(x, ends, q, deterministic=det), old_rows(x, ends, q, det))


@pytest.mark.parametrize("scheme,kw", [
    ("w8a8_int8", dict(H=1104)),                    # K = H over one exact fp32 chunk (two chunks)
    ("w8a8_int8", dict(H=2112)),                    # three chunks, summed in int64
    ("w4a8_int4", dict(H=192, I=96, group=32)),     # a custom int4 group
    ("w4a16_int4", dict(H=192, I=96, group=32)),
    ("w4a8_int4", dict(H=96, I=48, group=3)),       # an odd group: codes unpacked before the GEMM
    ("w4a16_int4", dict(H=96, I=48, group=3)),
    ("w8a8_fp8_block", dict(H=200)),                # H not a multiple of 128: padded blocks
    ("w8a16_int8", dict(H=100, I=52, dtype=torch.bfloat16)),     # rows of 200 and 104 bytes: padded strides
    ("w4a16_int4", dict(H=100, I=52, group=4, dtype=torch.float16)),
])
def test_bit_identical_other_shapes(scheme, kw):
    x, ends, q = _case(scheme, (3, 0, 11, 2), smooth=True, seed=2, **kw)
    for det in (False, True):
        _same(quant_experts_rows(x, ends, q, deterministic=det), old_rows(x, ends, q, det))


@pytest.mark.parametrize("sizes", [(40, 24), (1, 1, 1, 0, 1, 0, 0, 1)], ids=["tall", "fewer-rows-than-experts"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bit_identical_tile_heights(scheme, sizes):
    """Tiles of many rows (R >> E) and of one row (R < E)."""
    x, ends, q = _case(scheme, sizes, smooth=True, extra=0, seed=3)
    for det in (False, True):
        _same(quant_experts_rows(x, ends, q, deterministic=det), old_rows(x, ends, q, det))


@pytest.mark.parametrize("scheme", ["w8a16_int8", "w4a16_int4"])
def test_a16_tile_path_close(scheme, monkeypatch):
    """Where torch has no grouped GEMM (and on GPUs with few active experts) the a16 GEMMs run on
    tiles: each row's GEMM in another shape, so equal up to the GEMM's rounding."""
    monkeypatch.setattr(reference, "_has_grouped_mm", lambda t: False)
    x, ends, q = _case(scheme, SIZES, smooth=True, seed=4)
    got, want = quant_experts_rows(x, ends, q), old_rows(x, ends, q)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not got[int(ends[-1]):].any()


def test_whole_forward_and_nonfinite_rows():
    """Through the public op; a NaN token stays in its own rows."""
    x, ends, q = _case("w8a8_int8", SIZES)
    x[2] = float("nan")
    got = mo.moe_quant_experts(x, ends, q, backend="torch")
    want = old_rows(x, ends, q)
    assert torch.equal(got.isnan(), want.isnan()) and got[2].isnan().all()
    _same(torch.nan_to_num(got), torch.nan_to_num(want))


def test_meta_and_empty():
    x, ends, q = _case("w4a8_int4", SIZES)
    y = quant_experts_rows(x.to("meta"), ends.to("meta"), q.to("meta"))
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype
    assert quant_experts_rows(x[:0], torch.zeros(6, dtype=torch.int32), q).shape == (0, 256)
    none = quant_experts_rows(x, torch.zeros(6, dtype=torch.int32), q)     # no routed rows
    assert torch.equal(none, torch.zeros_like(x))


@pytest.mark.parametrize("m", [1, 3, 8, 64])
def test_tiles_cover_each_row_once(m):
    g = torch.Generator().manual_seed(m)
    for E, R in ((1, 7), (5, 30), (12, 9), (8, 200)):
        for _ in range(5):
            routed = int(torch.randint(0, R + 1, (), generator=g))
            cuts = torch.randint(0, routed + 1, (E - 1,), generator=g).sort().values
            ends = torch.cat([cuts, torch.tensor([routed])])
            tiles = grouped.make_tiles(ends, R, m, multiple=3)
            assert tiles.expert.shape[0] % 3 == 0 and tiles.expert.shape[0] >= grouped.tile_bound(R, E, m)
            dest = tiles.dest[tiles.dest < R]
            assert torch.equal(dest.sort().values, torch.arange(routed))         # every routed row once
            valid = tiles.dest < R
            assert torch.equal(tiles.src[valid], tiles.dest[valid])
            expert = grouped.row_experts(ends, R)
            assert torch.equal(expert[tiles.dest[valid]], tiles.expert.unsqueeze(1).expand(-1, m)[valid])
            assert (expert[routed:] == E).all()


def test_int4_codes_equal_unpack_int4():
    from mojo_opset.quant.matmul import int4_codes
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(4, 64)
    assert torch.equal(int4_codes(b), unpack_int4(b))


def test_bf16_operand_path(monkeypatch):
    """The CUDA formulation of the integer GEMMs (bf16 operands, fp32 result), emulated on the CPU."""
    from mojo_opset.quant import matmul
    monkeypatch.setattr(matmul, "_int_mm_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(matmul, "_exact_bmm", lambda a, b: torch.bmm(a.float(), b.float()))
    for scheme, kw in (("w8a8_int8", dict(H=1104)), ("w4a8_int4", dict(H=192, I=96, group=32))):
        x, ends, q = _case(scheme, (3, 0, 11, 2), seed=5, **kw)
        _same(quant_experts_rows(x, ends, q), old_rows(x, ends, q))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_mode_is_batch_invariant(scheme):
    x, ends, q = _case(scheme, SIZES, smooth=True, seed=6)
    gw = torch.randn(6, 256, generator=torch.Generator().manual_seed(7)) * 0.06
    with mo.deterministic():
        full = mo.quant_moe_forward(x, gw, q, 2, backend="torch")
        for i in (0, 13, x.shape[0] - 1):
            assert torch.equal(mo.quant_moe_forward(x[i:i + 1], gw, q, 2, backend="torch"), full[i:i + 1])
