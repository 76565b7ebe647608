"""Training through the triton backend (fused_moe_train + fused_moe_backward) against the reference,
in the interpreter on CPU (small shapes; fp32 tight, fp16 within tolerance) under strict, so a
fallback fails; both GEMM engines (Triton kernels, torch._grouped_mm). Model shapes: the gpu tests."""
import json

import pytest
import torch

import mojo_opset as mo

pytestmark = pytest.mark.skipif(not mo.available_backends().get("triton", {}).get("available"),
                                reason="triton backend unavailable")

ENGINES = ["triton", "gmm"]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=2e-2, atol=3e-3)}


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _layer(T, H, I, E, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    gw = torch.randn(E, H, generator=g) / H ** 0.5
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    return [t.to(_dev(), dtype) for t in (x, gw, w13, w2)]


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    monkeypatch.setenv("MOJO_TRITON_TRAIN_GEMM", request.param)
    return request.param


def _grads(backend, leaves, K, gy, **kw):
    leaves = [t.clone().requires_grad_() for t in leaves]
    y = mo.moe_forward(*leaves, K, backend=backend, **kw)
    return y, torch.autograd.grad(y, leaves, gy)


def _check(T, H, I, E, K, dtype, seed=0, **kw):
    layer = _layer(T, H, I, E, dtype, seed)
    gy = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 1)).to(_dev(), dtype)
    with mo.strict():
        y, grads = _grads("triton", layer, K, gy, **kw)
    assert mo.last_served("moe_forward")["served_by"] == "kernel"
    y_ref, ref = _grads("torch", layer, K, gy, **kw)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for name, a, b in zip(("x", "gate_weight", "w13", "w2"), grads, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"d{name}: {m}")
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H,I,E,K,kw", [
    (7, 32, 48, 5, 2, dict(route_norm=True)),
    (9, 64, 32, 16, 4, dict(score_func="sigmoid", route_norm=True, route_scale=2.5, num_expert_groups=4,
                            num_limited_groups=2)),       # groups
    (6, 48, 40, 6, 1, {}),                                # K = 1; sizes off the tiles
])
def test_gradients_match_reference(engine, dtype, T, H, I, E, K, kw):
    _check(T, H, I, E, K, dtype, seed=T * 7 + K, **kw)


def test_forced_ids(engine):
    forced = torch.tensor([[0, 7], [7, 0], [3, 4], [1, 2], [6, 5], [2, 3]], device=_dev())
    _check(6, 32, 16, 8, 2, torch.float32, seed=3, forced_expert_ids=forced, route_norm=True)


def test_zero_token_experts_get_zero_weight_grads(engine):
    from mojo_opset_triton.custom_ops import fused_moe_autograd

    x, _, w13, w2 = _layer(8, 32, 16, 6, torch.float32, seed=4)
    ids = torch.tensor([[0, 2], [2, 5], [5, 0]] * 2 + [[0, 5], [2, 0]], dtype=torch.int32, device=_dev())
    w = torch.rand(8, 2, device=_dev())
    leaves = [t.clone().requires_grad_() for t in (x, w, w13, w2)]
    y = fused_moe_autograd(leaves[0], ids, *leaves[1:])
    dx, dw, d13, d2 = torch.autograd.grad(y, leaves, torch.randn_like(y))
    for e in (1, 3, 4):                                    # experts no token chose
        assert d13[e].eq(0).all() and d2[e].eq(0).all()
    for e in (0, 2, 5):
        assert d13[e].abs().sum() > 0 and d2[e].abs().sum() > 0


def test_no_tokens(engine):
    x, gw, w13, w2 = _layer(0, 32, 16, 4, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, gw, w13, w2)]
    with mo.strict():
        y = mo.moe_forward(*leaves, 2, backend="triton")
    assert y.shape == (0, 32)
    grads = torch.autograd.grad(y, leaves, torch.zeros_like(y), allow_unused=True)
    assert grads[0].shape == (0, 32)
    for g in grads[2:]:
        assert g is None or g.eq(0).all()


def test_out_of_range_ids_contribute_nothing():
    # the op contract: an id outside [0, E) is never placed; its pair has no output and no gradient
    from mojo_opset_triton.training import fused_moe_backward
    from mojo_opset_triton.forward import fused_moe_forward

    x, _, w13, w2 = _layer(5, 32, 16, 4, torch.float32, seed=6)
    ids = torch.tensor([[0, 1], [2, -1], [3, 9], [1, 0], [2, 3]], dtype=torch.int32, device=_dev())
    ok = torch.tensor([[0, 1], [2, 2], [3, 3], [1, 0], [2, 3]], dtype=torch.int32, device=_dev())
    w = torch.rand(5, 2, device=_dev())
    w_ok = w.clone()
    w_ok[1, 1] = w_ok[2, 1] = 0      # the same layer with those slots weighted 0 (and a valid id)
    gy = torch.randn(5, 32, device=_dev())
    out, h = fused_moe_forward(x, ids, w, w13, w2, save_h=True)
    out_ok, h_ok = fused_moe_forward(x, ok, w_ok, w13, w2, save_h=True)
    torch.testing.assert_close(out, out_ok, **TOL[torch.float32])
    dx, dw, d13, d2 = fused_moe_backward(gy, x, ids, w, w13, w2, h)
    rx, rw, r13, r2 = fused_moe_backward(gy, x, ok, w_ok, w13, w2, h_ok)
    assert dw[1, 1] == 0 and dw[2, 1] == 0
    for a, b in zip((dx, d13, d2), (rx, r13, r2)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_two_steps_give_identical_gradients(engine):
    layer = _layer(12, 64, 32, 8, torch.float16, seed=8)
    gy = torch.randn(12, 64).to(_dev(), torch.float16)
    with mo.strict():
        a = _grads("triton", layer, 3, gy)[1]
        b = _grads("triton", layer, 3, gy)[1]
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_engines_agree():
    from mojo_opset_triton.training import STEPS, forward, fused_moe_backward

    x, _, w13, w2 = _layer(10, 64, 32, 6, torch.float32, seed=9)
    ids = torch.stack([torch.randperm(6)[:3] for _ in range(10)]).to(_dev(), torch.int32)
    w = torch.rand(10, 3, device=_dev())
    gy = torch.randn(10, 64, device=_dev())
    def grads(use):
        out, h = forward(x, ids, w, w13, w2, use=use)           # the backward overwrites h
        return (out,) + fused_moe_backward(gy, x, ids, w, w13, w2, h, use=use)

    base = grads(dict.fromkeys(STEPS, "triton"))
    for step in STEPS:
        use = dict.fromkeys(STEPS, "triton")
        use[step] = "gmm"
        for a, b in zip(grads(use), base):
            torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_engine_override_is_validated(monkeypatch):
    from mojo_opset_triton.training import engines

    x = torch.zeros(1, 32)
    monkeypatch.setenv("MOJO_TRITON_TRAIN_GEMM", "dact=gmm, dx=gmm")
    assert engines(x, 1, 4, 32, 16, 2) == {"fwd": "triton", "dact": "gmm", "dw2": "triton", "dw13": "triton",
                                           "dx": "gmm"}
    monkeypatch.setenv("MOJO_TRITON_TRAIN_GEMM", "gmm")
    assert set(engines(x, 1, 4, 32, 16, 2).values()) == {"gmm"}
    # rows of 40 bytes: torch._grouped_mm cannot run, every step stays on Triton
    assert set(engines(x[:, :10], 1, 4, 10, 16, 2).values()) == {"triton"}
    monkeypatch.setenv("MOJO_TRITON_TRAIN_GEMM", "dq=gmm")
    with pytest.raises(ValueError, match="MOJO_TRITON_TRAIN_GEMM"):
        engines(x, 1, 4, 32, 16, 2)


def test_a_second_backward_recomputes_the_overwritten_activation(engine):
    from mojo_opset_triton.custom_ops import fused_moe_autograd

    x, _, w13, w2 = _layer(6, 32, 16, 4, torch.float32, seed=14)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(6)]).to(_dev(), torch.int32)
    leaves = [t.clone().requires_grad_() for t in (x, torch.rand(6, 2, device=_dev()), w13, w2)]
    y = fused_moe_autograd(leaves[0], ids, *leaves[1:])
    gy = torch.randn_like(y)
    first = torch.autograd.grad(y, leaves, gy, retain_graph=True)
    second = torch.autograd.grad(y, leaves, gy)
    for u, v in zip(first, second):
        assert torch.equal(u, v)


def test_direct_inference_op_is_differentiable():
    # fused_moe saved no activation: its backward recomputes h, with the same gradients
    from mojo_opset_triton.custom_ops import fused_moe_autograd

    x, _, w13, w2 = _layer(6, 32, 16, 4, torch.float32, seed=10)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(6)]).to(_dev(), torch.int32)
    w = torch.rand(6, 2, device=_dev())
    gy = torch.randn(6, 32, device=_dev())
    a = [t.clone().requires_grad_() for t in (x, w, w13, w2)]
    b = [t.clone().requires_grad_() for t in (x, w, w13, w2)]
    ga = torch.autograd.grad(torch.ops.mojo_triton.fused_moe(a[0], ids, *a[1:]), a, gy)
    gb = torch.autograd.grad(fused_moe_autograd(b[0], ids, *b[1:]), b, gy)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_compile_fullgraph_traces_a_training_step():
    x, gw, w13, w2 = _layer(6, 32, 16, 4, torch.float32, seed=11)
    gy = torch.randn(6, 32).to(_dev())

    def layer(x, gw, w13, w2):
        return mo.moe_forward(x, gw, w13, w2, 2, route_norm=True, backend="triton")

    layer(x, gw, w13, w2)                  # the backend's kernels and caches load before tracing
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (x, gw, w13, w2)]
    ga = torch.autograd.grad(compiled(*a), a, gy)
    with mo.strict():
        b, gb = _grads("triton", (x, gw, w13, w2), 2, gy, route_norm=True)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, **TOL[torch.float32])


def test_compile_fullgraph_traces_the_training_ops():
    from mojo_opset_triton.custom_ops import fused_moe_autograd

    x, _, w13, w2 = _layer(5, 32, 16, 4, torch.float32, seed=13)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2]], dtype=torch.int32, device=_dev())
    w = torch.rand(5, 2, device=_dev())
    gy = torch.randn(5, 32, device=_dev())
    torch._dynamo.reset()
    compiled = torch.compile(fused_moe_autograd, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (x, w, w13, w2)]
    b = [t.clone().requires_grad_() for t in (x, w, w13, w2)]
    ga = torch.autograd.grad(compiled(a[0], ids, *a[1:]), a, gy)
    gb = torch.autograd.grad(fused_moe_autograd(b[0], ids, *b[1:]), b, gy)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_opcheck_training_ops():
    import mojo_opset_triton.custom_ops as ops

    x, _, w13, w2 = _layer(5, 32, 16, 4, torch.float32, seed=12)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2]], dtype=torch.int32, device=_dev())
    w = torch.rand(5, 2, device=_dev())
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.fused_moe_train, (x, ids, w, w13, w2), test_utils=tests)
    _, h = ops.fused_moe_train(x, ids, w, w13, w2)
    torch.library.opcheck(ops.fused_moe_backward, (torch.randn_like(x), x, ids, w, w13, w2, h), test_utils=tests)


def test_bench_train_quick(tmp_path, capsys):
    from mojo_opset.tools.cli import main

    js = tmp_path / "t.json"
    argv = ["bench", "--train", "--quick", "--models", "tiny", "--tokens", "12", "--dtype", "fp32", "--no-progress",
            "--json", str(js)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Training step of the routed experts" in out
    data = json.loads(js.read_text())
    assert data["mode"] == "train" and data["backend"] == "triton"
    recs = {r["path"]: r for r in data["results"]}
    assert set(recs) == {"triton", "torch", "recipe"}
    assert recs["triton"]["served_by"] == "kernel"
    for r in recs.values():
        assert r["ms"] > 0 and r["tflops"] > 0
        assert max(r["grad_rel_err"].values()) < 1e-4       # fp32: every path computes the same gradients
