"""Training through the triton backend on an NVIDIA GPU: gradients at the model shapes (bf16, both GEMM
engines), bit-identical repeated steps, a whole step captured in a CUDA graph and traced by
torch.compile, zero-token experts, fp16/fp32, peak memory against the grouped_mm recipe."""
import gc

import pytest
import torch

import mojo_opset as mo

pytestmark = pytest.mark.gpu

# (H, I, E, K, routing options); DeepSeek-V3 with 64 of its 256 experts
MODELS = {
    "mixtral-8x7b": (4096, 14336, 8, 2, dict(route_norm=True)),
    "qwen3-30b-a3b": (2048, 768, 128, 8, dict(route_norm=True)),
    "deepseek-v3-e64": (7168, 2048, 64, 8, dict(score_func="sigmoid", route_norm=True, route_scale=2.5,
                                                num_expert_groups=8, num_limited_groups=4)),
}
ENGINES = ["triton", "gmm"]


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    monkeypatch.setenv("MOJO_TRITON_TRAIN_GEMM", request.param)
    return request.param


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _layer(H, I, E, T, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * std).to(dtype)

    return randn(T, H), randn(E, H, std=H ** -0.5), randn(E, 2 * I, H, std=H ** -0.5), randn(E, H, I, std=I ** -0.5)


def _step(backend, leaves, K, gy, **kw):
    leaves = [t.detach().requires_grad_() for t in leaves]
    y = mo.moe_forward(*leaves, K, backend=backend, **kw)
    return torch.autograd.grad(y, leaves, gy)


@pytest.mark.parametrize("model", list(MODELS))
def test_model_shape_gradients_bf16(model, engine):
    H, I, E, K, kw = MODELS[model]
    T = 512
    layer = _layer(H, I, E, T, seed=1)
    gy = torch.randn(T, H, device="cuda").bfloat16()
    with mo.strict():
        got = _step("triton", layer, K, gy, **kw)
    assert mo.last_served("moe_forward")["served_by"] == "kernel"
    ref = _step("torch", layer, K, gy, **kw)
    for name, a, b in zip(("x", "gate_weight", "w13", "w2"), got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, b) < 2e-2, name
    del layer, got, ref
    gc.collect()
    torch.cuda.empty_cache()


def test_two_steps_bit_identical(engine):
    H, I, E, K, kw = MODELS["qwen3-30b-a3b"]
    layer = _layer(H, I, E, 1024, seed=2)
    gy = torch.randn(1024, H, device="cuda").bfloat16()
    with mo.strict():
        a = _step("triton", layer, K, gy, **kw)
        b = _step("triton", layer, K, gy, **kw)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_zero_token_experts(engine):
    from mojo_opset.functional.forward import routed_experts

    H, I, E, K = 256, 128, 16, 4
    x, _, w13, w2 = _layer(H, I, E, 200, seed=3)
    ids = torch.stack([torch.randperm(8, device="cuda")[:K] * 2 for _ in range(200)]).int()   # even experts only
    w = torch.rand(200, K, device="cuda")
    gy = torch.randn(200, H, device="cuda").bfloat16()
    for backend in ("triton", "torch"):
        leaves = [t.detach().requires_grad_() for t in (x, w, w13, w2)]
        y = routed_experts(leaves[0], ids, leaves[1], (leaves[2], leaves[3]), backend=backend)
        _, _, d13, d2 = torch.autograd.grad(y, leaves, gy)
        assert d13[1::2].eq(0).all() and d2[1::2].eq(0).all(), backend
        assert d13[0::2].abs().amax(dim=(1, 2)).gt(0).all(), backend


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(dtype):
    layer = _layer(256, 128, 16, 100, dtype=dtype, seed=4)
    gy = torch.randn(100, 256, device="cuda").to(dtype)
    with mo.strict():
        got = _step("triton", layer, 4, gy, route_norm=True)
    ref = _step("torch", layer, 4, gy, route_norm=True)
    for a, b in zip(got, ref):
        assert _rel(a, b) < (1e-4 if dtype == torch.float32 else 5e-3)


def test_k1_and_no_tokens():
    layer = _layer(256, 128, 8, 64, seed=5)
    gy = torch.randn(64, 256, device="cuda").bfloat16()
    with mo.strict():
        got = _step("triton", layer, 1, gy)
    for a, b in zip(got, _step("torch", layer, 1, gy)):
        assert _rel(a, b) < 2e-2
    empty = [t[:0] if i == 0 else t for i, t in enumerate(layer)]
    leaves = [t.detach().requires_grad_() for t in empty]
    with mo.strict():
        y = mo.moe_forward(*leaves, 2, backend="triton")
    grads = torch.autograd.grad(y, leaves, torch.zeros_like(y), allow_unused=True)
    assert grads[0].shape == (0, 256)


def test_cuda_graph_captures_a_training_step():
    H, I, E, K, kw = MODELS["qwen3-30b-a3b"]
    leaves = [t.requires_grad_() for t in _layer(H, I, E, 256, seed=6)]
    gy = torch.randn(256, H, device="cuda").bfloat16()

    def step():
        y = mo.moe_forward(*leaves, K, backend="triton", **kw)
        return torch.autograd.grad(y, leaves, gy)

    with mo.strict():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                eager = step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)


def test_compile_fullgraph_training_step():
    H, I, E, K, kw = MODELS["qwen3-30b-a3b"]
    layer = _layer(H, I, E, 256, seed=7)
    gy = torch.randn(256, H, device="cuda").bfloat16()

    def fn(x, gw, w13, w2):
        return mo.moe_forward(x, gw, w13, w2, K, backend="triton", **kw)

    torch._dynamo.reset()
    leaves = [t.detach().requires_grad_() for t in layer]
    got = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves), leaves, gy)
    with mo.strict():
        ref = _step("triton", layer, K, gy, **kw)
    for a, b in zip(got, ref):
        assert _rel(a, b) < 1e-3


def test_peak_memory_not_above_the_recipe():
    from mojo_opset.functional.forward import routed_experts
    from mojo_opset.tools.bench_train import recipe_layer

    H, I, E, K, _ = MODELS["qwen3-30b-a3b"]
    T = 4096
    x, _, w13, w2 = _layer(H, I, E, T, seed=8)
    ids = torch.rand(T, E, device="cuda").topk(K, dim=1).indices.int()
    w = torch.rand(T, K, device="cuda")
    gy = torch.randn(T, H, device="cuda").bfloat16()
    leaves = [t.detach().requires_grad_() for t in (x, w, w13, w2)]
    layers = {"triton": lambda *a: routed_experts(a[0], ids, a[1], (a[2], a[3]), backend="triton"),
              "torch": lambda *a: routed_experts(a[0], ids, a[1], (a[2], a[3]), backend="torch"),
              "recipe": lambda *a: recipe_layer(a[0], ids, a[1], a[2], a[3])}
    peak = {}
    for name, layer in layers.items():
        torch.autograd.grad(layer(*leaves), leaves, gy)       # warm-up (kernels, fused steps)
        torch.cuda.synchronize()
        gc.collect()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = torch.autograd.grad(layer(*leaves), leaves, gy)
        torch.cuda.synchronize()
        peak[name] = torch.cuda.max_memory_allocated() - base
        del grads
    print({k: f"{v / 2 ** 30:.2f} GiB" for k, v in peak.items()})
    assert peak["triton"] <= peak["recipe"]
    assert peak["torch"] <= peak["recipe"]


def test_reference_fused_steps_match_their_eager_code():
    # the reference's elementwise steps, compiled into one kernel on large CUDA inputs, compute the
    # same function as their eager torch code
    from mojo_opset.reference import experts as ref_experts
    from mojo_opset.reference.fused import MIN_ELEMENTS

    rows = MIN_ELEMENTS // 512 + 7
    g = torch.Generator(device="cuda").manual_seed(9)
    h = torch.randn(rows, 1024, device="cuda", generator=g).bfloat16()
    da = torch.randn(rows, 512, device="cuda", generator=g).bfloat16()
    assert _rel(ref_experts._swiglu_grad(h, da), ref_experts._swiglu_grad.__wrapped__(h, da)) < 1e-3
    assert _rel(ref_experts._swiglu(h), ref_experts._swiglu.__wrapped__(h)) < 1e-3
