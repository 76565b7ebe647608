"""The triton backend on an NVIDIA GPU: bf16 model shapes, CUDA graphs, torch.compile, int64 offsets."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset.functional.forward import routed_experts

pytestmark = pytest.mark.gpu

# (H, I, E, K, routing options); DeepSeek-V3 keeps all 256 experts (about 23 GB of bf16 weights)
MODELS = {
    "mixtral-8x7b": (4096, 14336, 8, 2, {}),
    "qwen3-30b-a3b": (2048, 768, 128, 8, dict(route_norm=True)),
    "deepseek-v3": (7168, 2048, 256, 8, dict(score_func="sigmoid", route_norm=True, route_scale=2.5,
                                             num_expert_groups=8, num_limited_groups=4)),
}


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _layer(H, I, E, dtype=torch.bfloat16, T=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    gw = (torch.randn(E, H, device="cuda", generator=g) / H ** 0.5).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5).to(dtype)
    return x, gw, w13, w2


@pytest.mark.parametrize("T", [1, 64, 300])
@pytest.mark.parametrize("model", list(MODELS))
def test_model_shapes_bf16(model, T):
    H, I, E, K, kw = MODELS[model]
    x, gw, w13, w2 = _layer(H, I, E, T=T)
    if "num_expert_groups" in kw:
        kw = dict(kw, expert_bias=torch.randn(E, device="cuda") * 0.01)
    with mo.strict():
        y, info = mo.moe_forward(x, gw, w13, w2, K, backend="triton", return_router_info=True, **kw)
    assert mo.last_served("moe_forward")["served_by"] == "kernel"
    assert mo.last_served("moe_gating")["served_by"] == "kernel"
    ref, rinfo = mo.moe_forward(x, gw, w13, w2, K, backend="torch", return_router_info=True, **kw)
    assert torch.equal(info["topk_ids"], rinfo["topk_ids"])
    torch.testing.assert_close(info["topk_weights"], rinfo["topk_weights"], rtol=1e-5, atol=1e-6)
    assert _rel(y, ref) < 1e-2
    # the fused experts alone, on the same ids: close to the grouped_mm path
    yk = torch.ops.mojo_triton.fused_moe(x, rinfo["topk_ids"], rinfo["topk_weights"], w13, w2)
    assert _rel(yk, routed_experts(x, rinfo["topk_ids"], rinfo["topk_weights"], (w13, w2), backend="torch")) < 1e-2
    del w13, w2
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(dtype):
    x, gw, w13, w2 = _layer(256, 128, 16, dtype=dtype, T=100)
    with mo.strict():
        y = mo.moe_forward(x, gw, w13, w2, 4, backend="triton")
    ref = mo.moe_forward(x, gw, w13, w2, 4, backend="torch")
    assert _rel(y, ref) < (1e-5 if dtype == torch.float32 else 3e-3)


def test_routing_kernel_deepseek_many_tokens():
    from mojo_opset.reference.gating import gating_reference

    g = torch.Generator(device="cuda").manual_seed(5)
    logits = torch.randn(4096, 256, device="cuda", generator=g)
    logits[7] = float("nan")
    bias = torch.randn(256, device="cuda", generator=g) * 0.01
    out = torch.ops.mojo_triton.moe_gating(logits, bias, None, 8, "sigmoid", True, 2.5, 8, 4, "top2_sum")
    ref = gating_reference(logits, 8, "sigmoid", True, 2.5, bias, 8, 4, "top2_sum")
    assert torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_gradients_bf16():
    x, gw, w13, w2 = _layer(256, 128, 8, T=48, seed=2)
    a = [t.clone().requires_grad_() for t in (x, gw, w13, w2)]
    b = [t.clone().requires_grad_() for t in (x, gw, w13, w2)]
    gy = torch.randn_like(x)
    with mo.strict():
        (mo.moe_forward(*a, 2, route_norm=True, backend="triton") * gy).sum().backward()
    (mo.moe_forward(*b, 2, route_norm=True, backend="torch") * gy).sum().backward()
    for u, v in zip(a, b):
        assert _rel(u.grad, v.grad) < 2e-2


@pytest.mark.parametrize("T", [1, 256])
def test_cuda_graph_capture(T):
    H, I, E, K, kw = MODELS["qwen3-30b-a3b"]
    x, gw, w13, w2 = _layer(H, I, E, T=T, seed=3)
    static_x = x.clone()

    def layer():
        return mo.moe_forward(static_x, gw, w13, w2, K, backend="triton", **kw)

    with mo.strict():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            layer()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer()
    for seed in (10, 11):
        new_x = torch.randn(T, H, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)).bfloat16()
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        ref = mo.moe_forward(new_x, gw, w13, w2, K, backend="triton", **kw)
        assert torch.equal(static_y, ref)   # deterministic: replay equals eager bit for bit


@pytest.mark.parametrize("T", [1, 16, 300])
def test_chained_launches_change_nothing(T, monkeypatch):
    """Programmatic dependent launch (the default on Hopper) against plain launches (MOJO_PDL=0):
    the same bits for the forward (routing, align or the one-token kernels, GEMMs, combine) and every
    quantized scheme (chained at T = 1 here: a few MB of weights, see quant_launch.CHAIN_MAX_BYTES)."""
    from mojo_opset_triton.pdl import pdl_on

    H, I, E, K, kw = MODELS["qwen3-30b-a3b"]
    x, gw, w13, w2 = _layer(H, I, E, T=T, seed=5)
    q = {s: mo.quantize_experts(w13, w2, s) for s in ("w8a16_int8", "w8a8_int8", "w4a16_int4", "w4a8_int4",
                                                       "w8a8_fp8_block")}

    def run():
        with mo.strict():
            out = [mo.moe_forward(x, gw, w13, w2, K, backend="triton", **kw)]
            out += [mo.quant_moe_forward(x, gw, qs, K, backend="triton", **kw) for qs in q.values()]
        torch.cuda.synchronize()
        return out

    assert pdl_on(x) == (torch.cuda.get_device_capability() >= (9, 0))
    chained = run()
    monkeypatch.setenv("MOJO_PDL", "0")
    assert not pdl_on(x)
    for a, b in zip(chained, run()):
        assert torch.equal(a, b)


def test_compile_fullgraph():
    H, I, E, K, kw = MODELS["qwen3-30b-a3b"]
    x, gw, w13, w2 = _layer(H, I, E, T=33, seed=4)

    def layer(x):
        return mo.moe_forward(x, gw, w13, w2, K, backend="triton", **kw)

    torch._dynamo.reset()
    with mo.strict():
        y = torch.compile(layer, fullgraph=True)(x)
    assert _rel(y, mo.moe_forward(x, gw, w13, w2, K, backend="torch", **kw)) < 1e-2


def test_offsets_beyond_int32():
    # T*K*H > 2^31 elements: the per-pair rows and the combine index past int32
    T, H, I, E, K = 270_000, 4096, 64, 8, 2
    assert T * K * H > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5).bfloat16()
    ids = torch.stack([torch.arange(T, device="cuda") % E, (torch.arange(T, device="cuda") + 3) % E], 1).int()
    w = torch.rand(T, K, device="cuda")
    y = torch.ops.mojo_triton.fused_moe(x, ids, w, w13, w2)
    tail = slice(T - 512, T)
    ref = routed_experts(x[tail], ids[tail], w[tail], (w13, w2), backend="torch")
    assert _rel(y[tail], ref) < 1e-2
    head = slice(0, 512)
    assert _rel(y[head], routed_experts(x[head], ids[head], w[head], (w13, w2), backend="torch")) < 1e-2


@pytest.mark.parametrize("model", list(MODELS))
def test_one_token_matrix_vector_kernels_at_model_shapes(model):
    """T == 1 runs the matrix-vector kernels (combine inside the down projection); as close to the
    grouped_mm path as the row-block kernels are."""
    from mojo_opset_triton.configs import get_config
    from mojo_opset_triton.forward import fused_moe_forward

    H, I, E, K, _ = MODELS[model]
    E = min(E, 4 * K)                     # the kernels read only the chosen experts: fewer keeps memory low
    x, _, w13, w2 = _layer(H, I, E, T=1, seed=4)
    ids = torch.randperm(E, device="cuda")[:K].view(1, K).to(torch.int32)
    w = torch.rand(1, K, device="cuda")
    cfg = get_config(x, 1, E, H, I, K)
    assert cfg.get("gemv"), "one token must take the matrix-vector kernels"
    ref = routed_experts(x, ids, w, (w13, w2), backend="torch")
    y = fused_moe_forward(x, ids, w, w13, w2)
    rows = fused_moe_forward(x, ids, w, w13, w2, dict(cfg, gemv=None))
    assert _rel(y, ref) < 5e-3 and _rel(rows, ref) < 5e-3
    del w13, w2
    torch.cuda.empty_cache()
