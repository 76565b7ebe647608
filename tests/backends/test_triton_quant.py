"""The triton backend's quantized MoE kernels against the exact quantized reference.

On CPU the kernels run in the Triton interpreter (tiny shapes; fp32/fp16 activations; no float8 there,
so the fp8 scheme is checked on the GPU only); on a GPU every scheme and bf16 are checked too."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset.quant import quant_experts_reference, quantize_experts
from mojo_opset.quant.activations import quantize_tokens_fp8, quantize_tokens_int8

pytestmark = pytest.mark.skipif(not mo.available_backends().get("triton", {}).get("available"),
                                reason="triton backend unavailable")

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
INT_SCHEMES = ("w8a16_int8", "w8a8_int8", "w4a16_int4", "w4a8_int4")
SCHEMES = INT_SCHEMES + (("w8a8_fp8_block",) if GPU else ())
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if GPU else ())


def _qm():
    from mojo_opset_triton import quant_launch as quant_moe

    return quant_moe


def _tol(scheme, dtype):
    if dtype == torch.float32:
        # int sums are exact; fp8 tensor-core block sums are not (the reference sums in float64)
        return dict(rtol=2e-3, atol=2e-3) if "fp8" in scheme else dict(rtol=1e-4, atol=1e-4)
    return dict(rtol=3e-2, atol=3e-2)


def _problem(T, H, I, E, K, scheme, dtype, group=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(DEV)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(DEV)
    q = quantize_experts(w13, w2, scheme, group_size=group)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(DEV, torch.int32)
    w = torch.rand(T, K, generator=g).to(DEV)
    return x, ids, w, q


def _run(x, ids, w, q, cfg=None):
    return _qm().quant_fused_moe_forward(x, ids, w, q.scheme, q.w13_q, q.w13_scale, q.w2_q, q.w2_scale,
                                         q.group_size, cfg=cfg)


WIDE = {"BLOCK_M": 32, "up": {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 2, "num_warps": 4, "num_stages": 2},
        "down": {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}}


def _cfg(x, q, tiles):
    """The device's default config, or wide K steps (several int4 groups per step, K tails)."""
    if tiles == "default":
        return None
    from mojo_opset_triton.quant_configs import legalize

    return legalize(WIDE, q.scheme, q.group_size if "int4" in q.scheme else None, x.element_size())


def _shapes(scheme):
    # the last shape has one token: a row block per pair, no align step
    if "fp8" in scheme:
        return [(5, 64, 128, 4, 2, None), (3, 200, 128, 3, 1, None), (1, 64, 128, 4, 3, None)]  # H % 128 != 0
    if "int4" in scheme:
        return [(5, 64, 32, 4, 2, 32), (7, 64, 64, 6, 3, 16), (3, 48, 32, 4, 1, 16), (1, 64, 32, 6, 3, 32)]
    return [(5, 64, 32, 4, 2, None), (7, 48, 40, 6, 3, None), (3, 32, 16, 4, 1, None), (1, 48, 40, 6, 3, None)]


@pytest.mark.parametrize("tiles", ["default", "wide"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_forward_matches_reference(scheme, dtype, tiles):
    for i, (T, H, I, E, K, group) in enumerate(_shapes(scheme)):
        x, ids, w, q = _problem(T, H, I, E, K, scheme, dtype, group, seed=i)
        y = _run(x, ids, w, q, _cfg(x, q, tiles))
        ref = quant_experts_reference(x, ids, w, q)
        assert y.dtype == dtype and y.shape == x.shape
        torch.testing.assert_close(y, ref, **_tol(scheme, dtype), msg=lambda m: f"{scheme} {T, H, I, E, K}: {m}")


@pytest.mark.parametrize("chunk_experts", [0, 2])     # every expert at once; chunks of 2 experts, the last of 1
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,group,step", [("w8a16_int8", None, None), ("w4a16_int4", 16, None),
                                               ("w4a16_int4", 32, 16)])    # 16-column steps: inside a group
def test_weight_only_dequantized_path(scheme, group, step, dtype, chunk_experts, monkeypatch):
    """Many rows per expert: the float GEMMs on the weights dequantized as the reference does, chunk by
    chunk; bit-identical to the float forward on those weights, close to the reference; K = 1 too."""
    from mojo_opset.quant.weights import dequantize_weight
    from mojo_opset_triton import dequant_kernel, quant_launch
    from mojo_opset_triton.forward import fused_moe_forward

    H, I, E = 64, 32, 5
    monkeypatch.setattr(quant_launch, "DEQUANT_MIN_ROWS", {"int8": 2, "int4": 2})
    if step:
        monkeypatch.setattr(dequant_kernel, "BLOCK_K", step)
    if chunk_experts:
        per_expert = 3 * H * I * torch.tensor([], dtype=dtype).element_size()
        monkeypatch.setattr(quant_launch, "dequant_budget", lambda: chunk_experts * per_expert)
    for T, K in ((6, 2), (11, 1)):
        x, ids, w, q = _problem(T, H, I, E, K, scheme, dtype, group)
        assert quant_launch.dequantize_first(scheme, T, E, K)
        ids[0, 0] = E                                          # an id out of range contributes nothing
        y = _run(x, ids, w, q)
        fmt = "int4" if "int4" in scheme else "int8"
        w13 = dequantize_weight(fmt, q.w13_q, q.w13_scale, group).to(dtype)
        w2 = dequantize_weight(fmt, q.w2_q, q.w2_scale, group).to(dtype)
        assert torch.equal(y, fused_moe_forward(x, ids, w, w13, w2))
        ref = quant_experts_reference(x, ids.clamp(max=E - 1), w * (ids < E), q)
        torch.testing.assert_close(y, ref, **_tol(scheme, dtype))


def test_dequant_budget_from_the_environment(monkeypatch):
    """MOJO_DEQUANT_MB bounds the dequantized weights a call holds; 0 keeps the quantized tiles at every
    size; anything but a non-negative integer is an error naming the variable."""
    from mojo_opset.functional.eager_graphs import kernel_state
    from mojo_opset_triton import quant_launch

    monkeypatch.delenv("MOJO_DEQUANT_MB", raising=False)
    assert quant_launch.dequant_budget() == quant_launch.DEQUANT_MB << 20
    assert quant_launch.dequantize_first("w4a16_int4", 4096, 128, 8)       # 256 rows per expert
    assert not quant_launch.dequantize_first("w4a8_int4", 4096, 128, 8)    # int8 activations: never
    state = kernel_state()
    monkeypatch.setenv("MOJO_DEQUANT_MB", "3")
    assert quant_launch.dequant_budget() == 3 << 20
    assert kernel_state() != state             # part of the replay key: replayed graphs follow the variable
    monkeypatch.setenv("MOJO_DEQUANT_MB", "0")
    assert not quant_launch.dequantize_first("w4a16_int4", 4096, 128, 8)
    monkeypatch.setenv("MOJO_DEQUANT_MB", "lots")
    with pytest.raises(ValueError, match="MOJO_DEQUANT_MB"):
        quant_launch.dequant_budget()


@pytest.mark.parametrize("chunk,reread,row_block,amax_step", [
    (None, True, False, None), (32, True, False, None), (32, True, False, 64), (32, False, False, None),
    (None, True, True, None), (32, True, True, None)])
def test_int8_row_quantization_is_the_reference(chunk, reread, row_block, amax_step, monkeypatch):
    """One chunk per row, and rows of several chunks: every chunk's program reading its whole row
    for the amax (short inputs; in one load or in steps, the last partial), or the chunk maxima
    first, then the codes per chunk; and whole rows per program (many rows), in one column step or
    several."""
    from mojo_opset_triton import quant_act_kernel
    from mojo_opset_triton.quant_act_kernel import deinterleave_rows, quantize_rows_int8

    if chunk:
        monkeypatch.setattr(quant_act_kernel, "ROW_CHUNK", chunk)     # 70 columns: 3 chunks, the last partial
        monkeypatch.setattr(quant_act_kernel, "ROW_STEP", chunk)
    if not reread:
        monkeypatch.setattr(quant_act_kernel, "REREAD_ELEMENTS", 0)
    if amax_step:
        monkeypatch.setattr(quant_act_kernel, "AMAX_STEP", amax_step)    # 70 columns: two steps
    monkeypatch.setattr(quant_act_kernel, "ROW_BLOCK_MIN_ROWS", 1 if row_block else 1 << 30)
    monkeypatch.setattr(quant_act_kernel, "ROW_BLOCK", 4)                # 9 rows: 3 programs, the last partial
    x = torch.randn(9, 70).to(DEV) * torch.rand(9, 1).to(DEV) * 10
    x[3] = 0.0                                               # an all-zero row: tiny scale, zero codes
    x[5, :7] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 63.5, -127.0])  # ties relative to the scale
    x[7, 50] = 200.0                                         # the row's max in a later chunk
    q, s = quantize_rows_int8(x)
    q_ref, s_ref = quantize_tokens_int8(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)
    qd, sd = quantize_rows_int8(x, deinterleave=True)         # what the int4 GEMMs read
    assert torch.equal(sd, s_ref)
    assert torch.equal(qd, torch.cat([q_ref[:, 0::2], q_ref[:, 1::2]], 1))
    assert torch.equal(deinterleave_rows(x[:, :68]), torch.cat([x[:, 0:68:2], x[:, 1:68:2]], 1))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [6, 1100])     # 8-row programs; FP8_ROW_BLOCK rows, the last block partial
def test_fp8_row_quantization_is_the_reference(rows):
    from mojo_opset_triton.quant_act_kernel import quantize_rows_fp8

    x = torch.randn(rows, 300, device="cuda") * 5
    x[2, 128:256] = 0.0
    q, s = quantize_rows_fp8(x)
    q_ref, s_ref = quantize_tokens_fp8(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("scheme,dtype", [("w4a16_int4", torch.float16), ("w4a8_int4", torch.float32)]
                         + ([("w4a16_int4", torch.bfloat16), ("w4a8_int4", torch.bfloat16)] if GPU else []))
def test_int4_code_paths_are_bit_identical(scheme, dtype, monkeypatch):
    """The bit-trick code conversions (per element; packed PTX on an NVIDIA GPU) give exactly the
    bits of the per-element conversion, for both int4 schemes, with one and several groups per K step."""
    from mojo_opset_triton import quant_kernel as qk

    paths = [qk.CODES_BITS] + ([qk.CODES_PTX] if GPU and torch.version.hip is None else [])
    for i, (T, H, I, E, K, group) in enumerate(_shapes(scheme)[:2]):
        x, ids, w, q = _problem(T, H, I, E, K, scheme, dtype, group, seed=10 + i)
        for tiles in ("default", "wide"):
            monkeypatch.setattr(qk, "CODES_OVERRIDE", qk.CODES_CONVERT)
            want = _run(x, ids, w, q, _cfg(x, q, tiles))
            for path in paths:
                monkeypatch.setattr(qk, "CODES_OVERRIDE", path)
                assert torch.equal(_run(x, ids, w, q, _cfg(x, q, tiles)), want), (path, tiles, i)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_one_token_with_ids_out_of_range(scheme):
    T, H, I, E, K, group = _shapes(scheme)[-1]
    x, ids, w, q = _problem(T, H, I, E, K, scheme, torch.float32, group, seed=4)
    ids[0, 1] = -1
    ids[0, 2] = E
    bad = (ids < 0) | (ids >= E)
    ref = quant_experts_reference(x, torch.where(bad, 0, ids), torch.where(bad, 0.0, w), q)
    torch.testing.assert_close(_run(x, ids, w, q), ref, **_tol(scheme, torch.float32))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_nan_token_and_out_of_range_ids(scheme):
    T, H, I, E, K, group = _shapes(scheme)[0]
    x, ids, w, q = _problem(T, H, I, E, K, scheme, torch.float32, group, seed=3)
    x[1, 3] = float("nan")
    ids[2, 0] = -1
    ids[4, 1] = E + 2
    y = _run(x, ids, w, q)
    assert torch.isnan(y[1]).all()
    bad = (ids < 0) | (ids >= E)
    ref = quant_experts_reference(x, torch.where(bad, 0, ids), torch.where(bad, 0.0, w), q)
    keep = torch.ones(T, dtype=torch.bool, device=DEV)
    keep[1] = False
    torch.testing.assert_close(y[keep], ref[keep], **_tol(scheme, torch.float32))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_permuted_rows_match_reference(scheme):
    """moe_quant_experts: rows already sorted by expert and padded to an alignment."""
    T, H, I, E, K, group = _shapes(scheme)[0]
    dtype = torch.float16
    x, ids, w, q = _problem(T, H, I, E, K, scheme, dtype, group, seed=4)
    counts = torch.bincount(ids.flatten().long(), minlength=E)
    padded = (counts + 7) // 8 * 8
    ends = torch.cumsum(padded, 0).to(torch.int32)
    R = int(padded.sum()) + 5                                  # rows past the last group stay zero
    px = torch.zeros(R, H, dtype=dtype, device=DEV)
    row_expert = torch.full((R,), -1, dtype=torch.int32, device=DEV)
    start = 0
    order = torch.sort(ids.flatten(), stable=True).indices
    pos = 0
    for e in range(E):
        c = int(counts[e])
        px[start:start + c] = x[order[pos:pos + c] // K]
        row_expert[start:int(ends[e])] = e
        start, pos = int(ends[e]), pos + c
    y = _qm().quant_experts_rows(px, ends, q.scheme, q.w13_q, q.w13_scale, q.w2_q, q.w2_scale, q.group_size)
    n = int(ends[-1])
    ref = quant_experts_reference(px[:n], row_expert[:n, None], torch.ones(n, 1, device=DEV), q)
    torch.testing.assert_close(y[:n], ref, **_tol(scheme, dtype))
    assert not y[n:].any()


GEMV_SCHEMES = ("w8a16_int8", "w8a8_int8", "w4a16_int4", "w4a8_int4")


def _tiled_and_gemv(x, q, gemv_tiles):
    """Configs forcing the tiled row blocks and the one-token kernels (with ``gemv_tiles``)."""
    from mojo_opset_triton.quant_configs import legalize

    group = q.group_size if "int4" in q.scheme else None
    tiled = legalize(dict(WIDE, gemv=None), q.scheme, group, x.element_size())
    return tiled, legalize(dict(WIDE, gemv=gemv_tiles), q.scheme, group, x.element_size())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", GEMV_SCHEMES)
def test_one_token_kernels_match_the_tiled_path(scheme, dtype, monkeypatch):
    """T = 1 on the matrix-vector kernels (quant_decode_kernel.py): against the reference and the tiled
    kernels; w8a8_int8's integer sums make it the tiled result bit for bit in fp16/bf16 (fp32: to
    rounding, the slots are summed in another order).  K tails (H or I not a multiple of the step),
    steps inside an int4 group and over whole groups, top-k not a power of two, ids out of range."""
    from mojo_opset_triton import quant_launch

    calls = []
    real = quant_launch.quant_gemv
    monkeypatch.setattr(quant_launch, "quant_gemv", lambda *a, **k: calls.append(k["up"]) or real(*a, **k))
    if "int4" in scheme:
        shapes = [(64, 32, 6, 3, 16), (128, 64, 5, 2, 32)]
    else:
        shapes = [(48, 40, 6, 3, None), (64, 32, 4, 4, None)]
    for i, (H, I, E, K, group) in enumerate(shapes):
        x, ids, w, q = _problem(1, H, I, E, K, scheme, dtype, group, seed=20 + i)
        if i == 1:
            ids[0, 0] = -1
            ids[0, K - 1] = E
        bad = (ids < 0) | (ids >= E)
        ref = quant_experts_reference(x, torch.where(bad, 0, ids), torch.where(bad, 0.0, w), q)
        # int4: 32-column steps hold whole groups of 16, lie inside groups of 32; 64-column steps hold two
        for tiles in ({"BLOCK_N": 4, "BLOCK_K": 32}, {"BLOCK_N": 2, "BLOCK_K": 16}, {"BLOCK_N": 2, "BLOCK_K": 64}):
            gemv = {n: dict(tiles, num_warps=4, num_stages=1) for n in ("up", "down")}
            tiled_cfg, gemv_cfg = _tiled_and_gemv(x, q, gemv)
            calls.clear()
            y = _run(x, ids, w, q, gemv_cfg)
            assert calls == [True, False], calls
            y_tiled = _run(x, ids, w, q, tiled_cfg)
            torch.testing.assert_close(y, ref, **_tol(scheme, dtype))
            if scheme == "w8a8_int8" and dtype != torch.float32:
                assert torch.equal(y, y_tiled)
            elif scheme == "w8a8_int8":     # fp32: the combine adds the slots in another order
                torch.testing.assert_close(y, y_tiled, rtol=1e-6, atol=1e-6)
            else:
                torch.testing.assert_close(y, y_tiled, **_tol(scheme, dtype))


def test_one_token_kernels_decline_unaligned_words():
    """Word loads need whole-word row strides: weights whose rows are not (a padded view) keep the row
    blocks, with the same result."""
    from mojo_opset_triton import quant_launch
    from mojo_opset_triton.quant_kernel import A_INT8 as af, W_INT8 as wf

    x, ids, w, q = _problem(1, 64, 32, 4, 2, "w8a8_int8", torch.float32, None, seed=5)
    wide = torch.zeros(q.w13_q.shape[0], q.w13_q.shape[1], 66, dtype=q.w13_q.dtype, device=DEV)
    wide[:, :, :64] = q.w13_q
    w13_view = wide[:, :, :64]                         # row stride 66 bytes: not whole words
    assert quant_launch.gemv_ready(x, wf, af, q.w13_q, q.w2_q)
    assert not quant_launch.gemv_ready(x, wf, af, w13_view, q.w2_q)
    y = quant_launch.quant_fused_moe_forward(x, ids, w, q.scheme, w13_view, q.w13_scale, q.w2_q, q.w2_scale, None)
    torch.testing.assert_close(y, quant_experts_reference(x, ids, w, q), **_tol(q.scheme, torch.float32))


def test_one_token_int4_bytes_need_no_whole_words(monkeypatch):
    """w4a16_int4's one-token kernels read codes as bytes: weights whose rows are not a whole number of
    words apart (a padded view) still take them, with the reference's result."""
    from mojo_opset_triton import quant_launch
    from mojo_opset_triton.quant_kernel import A_FLOAT as af, W_INT4 as wf

    x, ids, w, q = _problem(1, 64, 32, 4, 2, "w4a16_int4", torch.float32, 16, seed=6)
    wide = torch.zeros(q.w13_q.shape[0], q.w13_q.shape[1], 33, dtype=q.w13_q.dtype, device=DEV)
    wide[:, :, :32] = q.w13_q
    w13_view = wide[:, :, :32]                         # row stride 33 bytes
    assert quant_launch.gemv_ready(x, wf, af, w13_view, q.w2_q)
    calls = []
    real = quant_launch.quant_gemv
    monkeypatch.setattr(quant_launch, "quant_gemv", lambda *a, **k: calls.append(k["up"]) or real(*a, **k))
    _, gemv_cfg = _tiled_and_gemv(x, q, {n: dict(BLOCK_N=4, BLOCK_K=32, num_warps=4, num_stages=1) for n in ("up", "down")})
    y = quant_launch.quant_fused_moe_forward(x, ids, w, q.scheme, w13_view, q.w13_scale, q.w2_q, q.w2_scale, 16,
                                             cfg=gemv_cfg)
    assert calls == [True, False], calls
    torch.testing.assert_close(y, quant_experts_reference(x, ids, w, q), **_tol(q.scheme, torch.float32))


def test_one_token_configs_are_legal():
    from mojo_opset_triton.quant_configs import gemv_heuristic, legalize_gemv

    for scheme in GEMV_SCHEMES:
        group = 32 if "int4" in scheme else None
        for E, H, I, K in ((8, 4096, 14336, 2), (128, 2048, 768, 8), (256, 7168, 2048, 8)):
            g = legalize_gemv(gemv_heuristic(scheme, H, I, K), scheme, group)
            for c in g.values():
                bk, bn = c["BLOCK_K"], c["BLOCK_N"]
                assert bk & (bk - 1) == 0 and bn & (bn - 1) == 0 and bk >= 16
                if "int4" in scheme:
                    assert group % bk == 0 or bk % group == 0


def test_reasons():
    qm = _qm()
    x = torch.randn(2, 32, device=DEV)
    assert qm.quant_reasons(x, "w8a8_int8", None, 8) == []
    assert any("group_size 24" in r for r in qm.quant_reasons(x, "w4a8_int4", 24, 8))
    assert any("1024" in r for r in qm.quant_reasons(x, "w8a16_int8", None, 2000))
    if not GPU:
        assert any("interpreter" in r for r in qm.quant_reasons(x, "w8a8_fp8_block", 128, 8))


@pytest.mark.parametrize("scheme", ("w8a16_int8", "w8a8_int8", "w4a16_int4", "w4a8_int4", "w8a8_fp8_block"))
def test_configs_are_legal(scheme):
    from mojo_opset_triton.quant_configs import heuristic

    group = 128 if "int4" in scheme else None
    for T in (1, 16, 64, 256, 2048, 8192):
        for E, H, I, K in ((8, 4096, 14336, 2), (128, 2048, 768, 8), (256, 7168, 2048, 8)):
            cfg = heuristic(scheme, T, E, H, I, K, group, torch.bfloat16)
            for gemm in ("up", "down"):
                bk, bn = cfg[gemm]["BLOCK_K"], cfg[gemm]["BLOCK_N"]
                if "fp8" in scheme:
                    assert bk == 128 and 128 % bn == 0
                if "int4" in scheme:
                    assert bk % 2 == 0 and (bk % group == 0 or group % bk == 0)
                if "a8" in scheme:
                    assert bk // (2 if "int4" in scheme else 1) >= 32


def _served_ops():
    return mo.available_backends()["triton"].get("ops", [])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_public_forward_served_by_kernel(scheme):
    if "quant_moe_forward" not in _served_ops():
        pytest.skip("quant_moe_forward is not registered on the triton backend in this build")
    T, H, I, E, K, group = _shapes(scheme)[0]
    g = torch.Generator().manual_seed(11)
    dtype = torch.float16
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    gw = (torch.randn(E, H, generator=g) / H ** 0.5).to(DEV, dtype)
    q = quantize_experts((torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(DEV),
                         (torch.randn(E, H, I, generator=g) / I ** 0.5).to(DEV), scheme, group_size=group)
    with mo.strict():
        y, info = mo.quant_moe_forward(x, gw, q, K, backend="triton", return_router_info=True)
    assert mo.last_served("quant_moe_forward")["served_by"] == "kernel"
    ref = mo.quant_moe_forward(x, gw, q, K, backend="torch", forced_expert_ids=info["topk_ids"])
    torch.testing.assert_close(y, ref, **_tol(scheme, dtype))


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("T", [1, 16, 300])
def test_gpu_model_like_sizes(scheme, T):
    """Sizes whose heuristics pick the decode and the large configs (wgmma tiles, row kernels)."""
    E, H, I, K = 16, 512, 256, 4
    group = 128 if "int4" in scheme else None
    x, ids, w, q = _problem(T, H, I, E, K, scheme, torch.bfloat16, group, seed=T)
    y = _run(x, ids, w, q)
    ref = quant_experts_reference(x, ids, w, q)
    rel = (y.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 1e-2, f"{scheme} T={T}: relative error {rel:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gpu_captures_in_a_cuda_graph(scheme):
    E, H, I, K, T = 8, 256, 128, 2, 4
    group = 128 if "int4" in scheme else None
    x, ids, w, q = _problem(T, H, I, E, K, scheme, torch.bfloat16, group, seed=7)
    y0 = _run(x, ids, w, q)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _run(x, ids, w, q)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = _run(x, ids, w, q)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y0)


def test_quant_tuner_walks_the_row_block():
    """The tuner's neighbours include half and twice the row block (the tables once kept 16-row blocks
    where experts get about 16 rows, streaming some experts' weights twice); all legal."""
    from mojo_opset_triton.quant_configs import heuristic, legalize
    from mojo_opset_triton.quant_tune import candidates, search

    base = heuristic("w8a8_int8", 64, 8, 256, 512, 2, None, torch.bfloat16)     # 16 rows per expert
    assert base["BLOCK_M"] == 32
    cands = candidates(base, "w8a8_int8", None, 2)
    assert {16, 32, 64} <= {c["BLOCK_M"] for c in cands}
    assert all(legalize(c, "w8a8_int8", None, 2) == c for c in cands)
    best = search(lambda c: abs(c["BLOCK_M"] - 128) + c["up"]["num_stages"] * 1e-3, base, "w8a8_int8", None, 2,
                  rounds=4)                                # a made-up cost: 128-row blocks, shallow pipelines
    assert best[1]["BLOCK_M"] == 128 and best[0] < 1


@pytest.mark.parametrize("scheme", ["w8a8_int8", "w4a8_int4"])
def test_quant_tuner_one_token_search(scheme):
    """At T = 1 the tuner searches the one-token tiles (legal ones only) and keeps them only when they
    beat the row blocks (made-up timings)."""
    from mojo_opset_triton.quant_configs import heuristic, legalize_gemv
    from mojo_opset_triton.quant_tune import tune_gemv

    group = 128 if "int4" in scheme else None
    tiled = dict(heuristic(scheme, 1, 8, 4096, 14336, 2, group, torch.bfloat16), gemv=None)
    seen = []

    def cost(tiled_ms):
        def time_cfg(cfg):
            if cfg.get("gemv") is None:
                return tiled_ms
            g = cfg["gemv"]
            seen.append(g)
            # made up: 8-row up tiles and 1024-column down steps fastest
            return 0.1 + abs(g["up"]["BLOCK_N"] - 8) * 1e-3 + abs(g["down"]["BLOCK_K"] - 1024) * 1e-6
        return time_cfg

    ms, cfg = tune_gemv(cost(1.0), tiled, scheme, group, 2, 4096, 14336, log=lambda *_: None)
    assert cfg["gemv"]["up"]["BLOCK_N"] == 8 and cfg["gemv"]["down"]["BLOCK_K"] == 1024 and ms < 0.11
    assert all(legalize_gemv(g, scheme, group) == g for g in seen)
    ms, cfg = tune_gemv(cost(0.05), tiled, scheme, group, 2, 4096, 14336, log=lambda *_: None)
    assert cfg["gemv"] is None and ms == 0.05
