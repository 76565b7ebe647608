"""The triton backend's align/permute, fused experts (moe_forward) and combine against the reference,
in the interpreter on CPU (tiny shapes, fp16/fp32; bf16 checked on the GPU)."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset.contract import ForwardCall
from mojo_opset import dispatch
from mojo_opset.reference.combine import combine_reference
from mojo_opset.functional.forward import routed_experts
from mojo_opset.reference.permute import permute_reference

pytestmark = pytest.mark.skipif(not mo.available_backends().get("triton", {}).get("available"),
                                reason="triton backend unavailable")

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=2e-2, atol=2e-3),
       torch.bfloat16: dict(rtol=3e-2, atol=2e-2)}


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _layer(T, H, I, E, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    gw = torch.randn(E, H, generator=g) / H ** 0.5
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    return [t.to(_dev(), dtype) for t in (x, gw, w13, w2)]


def _served(op="moe_forward"):
    return mo.last_served(op)["served_by"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H,I,E,K,kw", [
    (5, 32, 48, 8, 2, {}),
    (9, 64, 32, 16, 4, dict(score_func="sigmoid", route_norm=True, route_scale=2.5, num_expert_groups=4,
                            num_limited_groups=2)),
    (3, 32, 16, 4, 1, {}),                # K == 1: the down GEMM writes tokens directly
    (4, 48, 40, 6, 3, dict(route_norm=True)),  # sizes that are not multiples of the tiles
])
def test_forward_matches_reference(dtype, T, H, I, E, K, kw):
    x, gw, w13, w2 = _layer(T, H, I, E, dtype, seed=T * 31 + E)
    with mo.strict():
        y, info = mo.moe_forward(x, gw, w13, w2, K, backend="triton", return_router_info=True, **kw)
    assert _served() == "kernel" and _served("moe_gating") == "kernel"
    ref = mo.moe_forward(x, gw, w13, w2, K, backend="torch", **kw)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, ref, **TOL[dtype])


def test_bf16_in_the_interpreter_is_upcast():
    x, gw, w13, w2 = _layer(6, 32, 32, 4, torch.bfloat16, seed=5)
    with mo.strict():
        y = mo.moe_forward(x, gw, w13, w2, 2, backend="triton")
    ref = mo.moe_forward(x, gw, w13, w2, 2, backend="torch")
    torch.testing.assert_close(y, ref, **TOL[torch.bfloat16])


def _op_ref(x, ids, w, w13, w2):
    return routed_experts(x, ids, w, (w13, w2), backend="torch")


def test_all_tokens_to_one_expert_and_empty_experts():
    x, _, w13, w2 = _layer(21, 32, 32, 8, torch.float32, seed=7)
    ids = torch.stack([torch.full((21,), 5), torch.full((21,), 2)], 1).to(_dev(), torch.int32)
    w = torch.rand(21, 2, device=_dev())
    y = torch.ops.mojo_triton.fused_moe(x, ids, w, w13, w2)
    torch.testing.assert_close(y, _op_ref(x, ids, w, w13, w2), **TOL[torch.float32])


def test_out_of_range_ids_contribute_nothing():
    x, _, w13, w2 = _layer(6, 32, 16, 4, torch.float32, seed=8)
    ids = torch.tensor([[0, 1], [2, -1], [4, 3], [1, 0], [-1, 7], [3, 2]], dtype=torch.int32, device=_dev())
    w = torch.rand(6, 2, device=_dev())
    bad = (ids < 0) | (ids >= 4)
    y = torch.ops.mojo_triton.fused_moe(x, ids, w, w13, w2)
    ref = _op_ref(x, torch.where(bad, 0, ids), torch.where(bad, 0.0, w), w13, w2)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])
    ids1 = ids[:, 1:].contiguous()  # K == 1 path
    y1 = torch.ops.mojo_triton.fused_moe(x, ids1, w[:, 1:], w13, w2)
    ref1 = _op_ref(x, torch.where(bad[:, 1:], 0, ids1), torch.where(bad[:, 1:], 0.0, w[:, 1:]), w13, w2)
    torch.testing.assert_close(y1, ref1, **TOL[torch.float32])


def _tiles_only():
    """The interpreter's config without the one-token (matrix-vector) tiles: T == 1 then takes row blocks."""
    from mojo_opset_triton.configs import INTERPRETER

    return {k: v for k, v in INTERPRETER.items() if k != "gemv"}


@pytest.mark.parametrize("path", ["gemv", "row blocks"])
@pytest.mark.parametrize("row", [[3, -1, 0], [5, 1, 2], [2, 9, 1]])
def test_one_token(row, path):
    """T == 1 skips the align step: matrix-vector kernels with the combine in the down projection
    (``gemv``), or each pair its own row block (a config without ``gemv`` tiles).  Ids out of range
    still contribute nothing, K == 1 writes the token's row directly."""
    from mojo_opset_triton.forward import fused_moe_forward

    cfg = None if path == "gemv" else _tiles_only()
    x, _, w13, w2 = _layer(1, 32, 16, 6, torch.float32, seed=11)
    ids = torch.tensor([row], dtype=torch.int32, device=_dev())
    w = torch.rand(1, 3, device=_dev())
    bad = (ids < 0) | (ids >= 6)
    y = fused_moe_forward(x, ids, w, w13, w2, cfg)
    torch.testing.assert_close(y, _op_ref(x, torch.where(bad, 0, ids), torch.where(bad, 0.0, w), w13, w2),
                               **TOL[torch.float32])
    y1 = fused_moe_forward(x, ids[:, :1].contiguous(), w[:, :1], w13, w2, cfg)
    torch.testing.assert_close(y1, _op_ref(x, torch.where(bad[:, :1], 0, ids[:, :1]), torch.where(bad[:, :1], 0.0, w[:, :1]),
                                           w13, w2), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,I,K", [(48, 40, 3), (64, 32, 8), (40, 72, 5)])
def test_one_token_matrix_vector_kernels(dtype, H, I, K):
    """Sizes that are not multiples of the tiles, K not a power of two; the same bits whether the
    combine runs in the down kernel or after the row-block path, up to the order of the K-sum."""
    from mojo_opset_triton.forward import fused_moe_forward

    E = 9
    x, _, w13, w2 = _layer(1, H, I, E, dtype, seed=H + I + K)
    ids = torch.randperm(E, generator=torch.Generator().manual_seed(K))[:K].view(1, K).to(_dev(), torch.int32)
    w = torch.rand(1, K, device=_dev())
    y = fused_moe_forward(x, ids, w, w13, w2)
    tol = TOL[torch.float32] if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(y, _op_ref(x, ids, w, w13, w2), **tol)
    torch.testing.assert_close(y, fused_moe_forward(x, ids, w, w13, w2, _tiles_only()), **tol)


@pytest.mark.parametrize("evict", ["evict_first", "evict_last"])
def test_one_token_eviction_policy_changes_no_bit(evict):
    """The tuned ``evict`` of the matrix-vector kernels is a cache hint on the weight loads only."""
    from mojo_opset_triton.configs import get_config
    from mojo_opset_triton.forward import fused_moe_forward

    H, I, E, K = 64, 48, 6, 3
    x, _, w13, w2 = _layer(1, H, I, E, torch.bfloat16, seed=21)
    ids = torch.tensor([[4, 0, 2]], dtype=torch.int32, device=_dev())
    w = torch.rand(1, K, device=_dev())
    cfg = get_config(x, 1, E, H, I, K)
    hinted = dict(cfg, gemv={k: dict(v, evict=evict) for k, v in cfg["gemv"].items()})
    assert torch.equal(fused_moe_forward(x, ids, w, w13, w2, hinted), fused_moe_forward(x, ids, w, w13, w2, cfg))


def test_one_token_with_strided_weights_takes_row_blocks():
    """The matrix-vector kernels read rows along H; weights strided there take the row-block path."""
    from mojo_opset_triton.decode_kernel import gemv_ready

    x, gw, w13, w2 = _layer(1, 32, 16, 4, torch.float32, seed=12)
    w13t = w13.transpose(1, 2).contiguous().transpose(1, 2)
    assert not gemv_ready(x, w13t, w2) and gemv_ready(x, w13, w2)
    with mo.strict():
        y = mo.moe_forward(x, gw, w13t, w2, 2, backend="triton")
    torch.testing.assert_close(y, mo.moe_forward(x, gw, w13, w2, 2, backend="torch"), **TOL[torch.float32])


def test_chained_launches_are_off_without_a_hopper_gpu(monkeypatch):
    from mojo_opset_triton import pdl

    assert pdl.launch_options(False) == {"PDL": False}
    assert pdl.launch_options(True) == {"PDL": True, "launch_pdl": True}
    assert not pdl.pdl_on(torch.zeros(1))
    monkeypatch.setenv("MOJO_PDL", "maybe")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="MOJO_PDL"):
            pdl.pdl_on(torch.zeros(1, device="cuda"))


def test_non_contiguous_inputs():
    x, gw, w13, w2 = _layer(7, 64, 32, 4, torch.float16, seed=9)
    xs = x[:, ::2]                                           # column stride 2
    w13t = w13.transpose(1, 2).contiguous().transpose(1, 2)  # [E, 2I, H] with unit stride along 2I
    w2t = w2[:, :32, :]                                       # a slice of H (row stride stays I)
    gws = gw[:, ::2]
    with mo.strict():
        y = mo.moe_forward(xs, gws, w13t[:, :, ::2], w2t, 2, backend="triton")
    assert _served() == "kernel"
    ref = mo.moe_forward(xs.contiguous(), gws.contiguous(), w13t[:, :, ::2].contiguous(), w2t.contiguous(), 2,
                         backend="torch")
    torch.testing.assert_close(y, ref, **TOL[torch.float16])


@pytest.mark.parametrize("T", [0, 1])
def test_tiny_token_counts(T):
    x, gw, w13, w2 = _layer(T, 32, 16, 4, torch.float32, seed=10)
    with mo.strict():
        y = mo.moe_forward(x, gw, w13, w2, 2, backend="triton")
    assert y.shape == (T, 32)
    torch.testing.assert_close(y, mo.moe_forward(x, gw, w13, w2, 2, backend="torch"), **TOL[torch.float32])


def test_forced_ids_end_to_end():
    x, gw, w13, w2 = _layer(6, 32, 16, 8, torch.float32, seed=11)
    forced = torch.tensor([[0, 7], [7, 0], [3, 4], [1, 2], [6, 5], [2, 3]], device=_dev())
    with mo.strict():
        y = mo.moe_forward(x, gw, w13, w2, 2, forced_expert_ids=forced, backend="triton", route_norm=True)
    ref = mo.moe_forward(x, gw, w13, w2, 2, forced_expert_ids=forced, backend="torch", route_norm=True)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])


def test_gradients_match_reference():
    x, gw, w13, w2 = _layer(7, 32, 16, 4, torch.float32, seed=12)
    leaves = [t.clone().requires_grad_() for t in (x, gw, w13, w2)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, gw, w13, w2)]
    gy = torch.randn(7, 32, device=_dev())
    with mo.strict():
        y = mo.moe_forward(*leaves, 2, route_norm=True, backend="triton")
    assert _served() == "kernel"
    (y * gy).sum().backward()
    (mo.moe_forward(*ref_leaves, 2, route_norm=True, backend="torch") * gy).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_traces_the_custom_op():
    x, gw, w13, w2 = _layer(5, 32, 16, 4, torch.float32, seed=13)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2]], dtype=torch.int32, device=_dev())
    w = torch.rand(5, 2, device=_dev())

    def f(x, ids, w):
        return torch.ops.mojo_triton.fused_moe(x, ids, w, w13, w2) * 2

    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, ids, w)
    torch.testing.assert_close(y, 2 * _op_ref(x, ids, w, w13, w2), **TOL[torch.float32])


@pytest.mark.parametrize("align", [1, 8, 16])
def test_permute_op_matches_reference_exactly(align):
    g = torch.Generator().manual_seed(align)
    x = torch.randn(11, 24, generator=g).to(_dev())
    ids = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(11)]).to(_dev(), torch.int32)
    ids[4] = torch.tensor([5, 0, 1])                       # leave some experts busier than others
    with mo.strict():
        out = mo.moe_permute(x, ids, 6, align=align, backend="triton")
    assert mo.last_served("moe_permute")["served_by"] == "kernel"
    for a, b in zip(out, permute_reference(x, ids, 6, align)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_permute_op_large_chunks_stay_stable():
    # more pairs than one histogram chunk, with heavy repetition: order must stay stable in the pair index
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 3, (300, 2), generator=g, dtype=torch.int32).to(_dev())
    x = torch.randn(300, 8, generator=g).to(_dev())
    out = torch.ops.mojo_triton.moe_permute(x, ids, 3, 16)
    for a, b in zip(out, permute_reference(x, ids, 3, 16)):
        assert torch.equal(a, b)


def test_combine_op_matches_reference():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 5, (9, 3), generator=g, dtype=torch.int32).to(_dev())
    y = torch.randn(9 * 3 + 5 * 7, 16, generator=g).to(_dev(), torch.float16)
    _, _, _, _, pair_row = permute_reference(torch.zeros(9, 1, device=_dev()), ids, 5, 8)
    w = torch.rand(9, 3, generator=g).to(_dev())
    with mo.strict():
        out = mo.moe_combine(y, pair_row, w, backend="triton")
    assert mo.last_served("moe_combine")["served_by"] == "kernel"
    torch.testing.assert_close(out, combine_reference(y, pair_row, w, 9), **TOL[torch.float16])


def test_declines_with_reasons():
    impl = mo.registry.get_entry("triton").impls()["moe_forward"]
    x, _, w13, w2 = _layer(3, 32, 16, 4, torch.float16)
    ids = torch.zeros(3, 2, dtype=torch.int32, device=_dev())
    w = torch.ones(3, 2, device=_dev())
    r = impl.declared_reasons(ForwardCall(x=x, topk_ids=ids, topk_weights=w, w13=w13, w2=w2, activation="gelu"))
    assert any("activation='gelu'" in s for s in r)
    r = impl.declared_reasons(ForwardCall(x=x.double(), topk_ids=ids, topk_weights=w, w13=w13.double(),
                                          w2=w2.double()))
    assert any("float64" in s for s in r)
    # mixed dtypes reach the backend through the public API and are declined there
    x, gw, w13, w2 = _layer(3, 32, 16, 4, torch.float32)
    with mo.strict(), pytest.raises(mo.StrictFallbackError, match="dtype"):
        mo.moe_forward(x, gw, w13.half(), w2.half(), 2, backend="triton")
    y = mo.moe_forward(x, gw, w13.half(), w2.half(), 2, backend="triton")
    assert _served() == "fallback" and y.shape == x.shape


def test_one_token_tile_search_keeps_the_fastest_trial(monkeypatch):
    """``tune.tune_gemv`` with made-up times (no kernel runs): tiles, then pipeline depths, then the
    eviction policy; the config it returns is the fastest trial, ``evict`` recorded only when set,
    and no ``gemv`` when the row blocks stay faster."""
    from mojo_opset.tools.bench_models import resolve
    from mojo_opset_triton import tune

    model = resolve(["qwen3"])[0]

    def fake_time(x, ids, w, w13, w2, cfg):
        g = cfg.get("gemv")
        if g is None:
            return tiled_ms[0]
        up, down = g["up"], g["down"]
        return (10.0 - (up["BLOCK_N"] == 8) - 0.5 * (up.get("evict") == "evict_first")
                - 0.25 * (up["num_stages"] == 2) - 0.1 * (down["BLOCK_K"] == 256) + 0.3 * ("evict" in down))

    seen = []
    monkeypatch.setattr(tune, "fused_moe_forward", fake_time)
    monkeypatch.setattr(tune, "_try", lambda timer, fn, T: fn())
    tiled_ms = [100.0]
    cfg, t = tune.tune_gemv(None, model, {"BLOCK_M": 16}, None, None, None, None, None,
                            log=lambda which, tile, ms: seen.append(which))
    up, down = cfg["gemv"]["up"], cfg["gemv"]["down"]
    assert (up["BLOCK_N"], up["num_stages"], up["evict"]) == (8, 2, "evict_first")
    assert down["BLOCK_K"] == 256 and "evict" not in down
    assert t == pytest.approx(10.0 - 1 - 0.5 - 0.25 - 0.1)
    assert seen[0] == "tiled" and {"up", "down"} <= set(seen)
    tiled_ms[0] = 1.0
    cfg, t = tune.tune_gemv(None, model, {"BLOCK_M": 16}, None, None, None, None, None)
    assert cfg["gemv"] is None and t == 1.0
