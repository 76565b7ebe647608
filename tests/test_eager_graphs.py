"""Repeated eager forwards of a few tokens replayed from CUDA graphs (mojo_opset.functional.eager_graphs):
bit-identical to the launches they replace, never used where the replay could differ."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset import dispatch
from mojo_opset.functional import eager_graphs
from mojo_opset.functional.routing import ROUTING_SCALARS

gpu = pytest.mark.gpu
H, I, E, K = 256, 128, 16, 4
ROUTING = dict(score_func="sigmoid", route_norm=True, route_scale=2.5, num_expert_groups=4, num_limited_groups=2)


def _layer(T=2, seed=0, dtype=torch.bfloat16, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    gw = (torch.randn(E, H, generator=g) / H ** 0.5).to(device, dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(device, dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(device, dtype)
    bias = (torch.randn(E, generator=g) * 0.1).to(device)
    return x, gw, w13, w2, bias


def _fwd(x, gw, w13, w2, bias, **kw):
    return mo.moe_forward(x, gw, w13, w2, K, expert_bias=bias, backend="triton", **ROUTING, **kw)


def _no_graphs(monkeypatch, fn):
    monkeypatch.setenv("MOJO_EAGER_GRAPHS", "0")
    try:
        return fn()
    finally:
        monkeypatch.delenv("MOJO_EAGER_GRAPHS")


@pytest.fixture(autouse=True)
def _fresh_cache():
    eager_graphs.clear()
    yield
    eager_graphs.clear()


def test_cpu_calls_never_use_graphs():
    x, gw, w13, w2, bias = _layer(device="cpu", dtype=torch.float32)
    before = eager_graphs.stats()
    for _ in range(3):
        mo.moe_forward(x, gw, w13, w2, K, expert_bias=bias, backend="torch", **ROUTING)
    assert eager_graphs.stats() == before


def test_collecting_mutes_only_when_asked():
    dispatch.reset_stats()
    with dispatch.collecting(mute=True) as recs:
        mo.moe_gating(torch.randn(3, 8), torch.randn(4, 8), 2, backend="torch")
    assert recs and dispatch.last_served() == {}
    dispatch.record_again(recs)
    assert dispatch.last_served("moe_gating")["served_by"] == "reference"


@gpu
@pytest.mark.parametrize("T", [1, 3, 64, 256])
def test_replays_match_launches_for_new_inputs(monkeypatch, T):
    x, gw, w13, w2, bias = _layer(T)
    outs = [_fwd(x * (i + 1), gw, w13, w2, bias) for i in range(5)]     # eager, capture, 3 replays
    st = eager_graphs.stats()
    assert st["captures"] == 1 and st["replays"] == 3, st
    for i, y in enumerate(outs):
        ref = _no_graphs(monkeypatch, lambda: _fwd(x * (i + 1), gw, w13, w2, bias))
        assert torch.equal(y, ref), i
    assert dispatch.last_served("moe_forward") == {"backend": "triton", "served_by": "kernel", "reasons": []}


@gpu
def test_router_info_and_outputs_are_the_callers_own(monkeypatch):
    x, gw, w13, w2, bias = _layer(4)
    runs = [_fwd(x + i, gw, w13, w2, bias, return_router_info=True) for i in range(4)]
    for i, (y, info) in enumerate(runs):
        y_ref, info_ref = _no_graphs(monkeypatch, lambda: _fwd(x + i, gw, w13, w2, bias, return_router_info=True))
        assert torch.equal(y, y_ref)
        assert info.keys() == info_ref.keys()
        for k in info:
            assert torch.equal(info[k], info_ref[k]), k
    assert runs[2][0].data_ptr() != runs[3][0].data_ptr()


@gpu
def test_weights_changed_in_place_are_read_and_other_tensors_are_other_keys(monkeypatch):
    x, gw, w13, w2, bias = _layer(2)
    for _ in range(3):
        _fwd(x, gw, w13, w2, bias)
    w2.mul_(0.5)
    bias.add_(0.3)
    y = _fwd(x, gw, w13, w2, bias)
    assert eager_graphs.stats()["replays"] == 2
    assert torch.equal(y, _no_graphs(monkeypatch, lambda: _fwd(x, gw, w13, w2, bias)))
    w2b = w2.clone() * 2
    y2 = _fwd(x, gw, w13, w2b, bias)
    assert eager_graphs.stats()["replays"] == 2       # a new key: launched, not replayed
    assert torch.equal(y2, _no_graphs(monkeypatch, lambda: _fwd(x, gw, w13, w2b, bias)))


@gpu
def test_autograd_backend_choice_and_streams_are_respected(monkeypatch):
    x, gw, w13, w2, bias = _layer(2)
    for _ in range(3):
        _fwd(x, gw, w13, w2, bias)
    w13g = w13.clone().requires_grad_()
    _fwd(x, gw, w13g, w2, bias).float().sum().backward()
    assert w13g.grad is not None
    with mo.use_backend("torch"):
        mo.moe_forward(x, gw, w13, w2, K, expert_bias=bias, **ROUTING)
        assert dispatch.last_served("moe_forward")["served_by"] == "reference"
    plain = lambda: mo.moe_forward(x, gw, w13, w2, K, expert_bias=bias, **ROUTING)   # noqa: E731
    for _ in range(3):
        plain()          # the default backend on CUDA: triton, replayed from the third call
    assert dispatch.last_served("moe_gating")["served_by"] == "kernel"
    monkeypatch.setenv("MOJO_BACKEND_MOE_GATING", "torch")
    plain()
    assert dispatch.last_served("moe_gating")["served_by"] == "reference"
    monkeypatch.delenv("MOJO_BACKEND_MOE_GATING")
    n = eager_graphs.stats()["replays"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y_side = _fwd(x, gw, w13, w2, bias)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y_side, _fwd(x, gw, w13, w2, bias))
    assert eager_graphs.stats()["replays"] == n + 1     # only the last call replayed


@gpu
def test_inside_a_users_capture_the_kernels_are_captured():
    x, gw, w13, w2, bias = _layer(2)
    for _ in range(3):
        _fwd(x, gw, w13, w2, bias)
    n = eager_graphs.stats()["replays"]
    static_x = x.clone()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _fwd(static_x, gw, w13, w2, bias)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        y = _fwd(static_x, gw, w13, w2, bias)
    static_x.copy_(x * 3)
    g.replay()
    ref = _fwd(x * 3, gw, w13, w2, bias)
    assert torch.equal(y, ref)
    assert eager_graphs.stats()["replays"] == n + 1     # only the last eager call


@gpu
def test_module_in_eval_and_quantized_forward(monkeypatch):
    cfg = mo.MoE.Config(num_experts=E, hidden_size=H, experts=mo.GroupedExperts.Config(intermediate_size=I),
                        router=mo.Router.Config(top_k=K),
                        shared_experts=mo.SharedExperts.Config(intermediate_size=I, gate=True))
    layer = cfg.build(dtype=torch.bfloat16, device="cuda").eval()
    x = torch.randn(1, 3, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ys = [layer(x * i) for i in range(1, 5)]
        refs = _no_graphs(monkeypatch, lambda: [layer(x * i) for i in range(1, 5)])
    assert all(torch.equal(a, b) for a, b in zip(ys, refs))
    _, gw, w13, w2, _ = _layer(2)
    q = mo.quantize_experts(w13, w2, "w8a8_int8")
    xs = [torch.randn(2, H, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    got = [mo.quant_moe_forward(xi, gw, q, K, backend="triton") for xi in xs]
    want = _no_graphs(monkeypatch, lambda: [mo.quant_moe_forward(xi, gw, q, K, backend="triton") for xi in xs])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert eager_graphs.stats()["replays"] >= 4


def test_the_switch_reads_like_every_flag(monkeypatch):
    monkeypatch.delenv("MOJO_EAGER_GRAPHS", raising=False)
    assert eager_graphs.enabled()
    monkeypatch.setenv("MOJO_EAGER_GRAPHS", "off")
    assert not eager_graphs.enabled()
    monkeypatch.setenv("MOJO_EAGER_GRAPHS", "maybe")
    with pytest.raises(ValueError, match="MOJO_EAGER_GRAPHS"):
        eager_graphs.enabled()


def _op_args(quant=None, info=True, dtype=torch.float32):
    x, gw, w13, w2, bias = _layer(3, device="cpu", dtype=dtype)
    routing = dict(mo.functional.forward.routing_kwargs(None, "sigmoid", True, 2.5, bias, 4, 2, "top2_sum",
                                                        torch.float32, None))
    if quant:
        q = mo.quantize_experts(w13, w2, quant)
        weights = (q.w13_q, q.w13_scale, q.w2_q, q.w2_scale, q.w13_smooth, q.w2_smooth)
        experts, kind = q, (q.scheme, q.group_size)
    else:
        weights, experts, kind = (w13, w2), (w13, w2), None
    tensors = (gw, None, bias, None, None, None, *weights)
    return x, gw, experts, tensors, routing, kind


@pytest.mark.parametrize("quant", [None, "w8a8_int8"])
@pytest.mark.parametrize("info", [True, False])
def test_compiled_inference_op_is_the_eager_forward(quant, info):
    from mojo_opset.functional import inference_op

    x, gw, experts, tensors, routing, kind = _op_args(quant, info)
    got = inference_op.call(x, tensors, K, routing, kind, "swiglu", info, "torch")
    fn = mo.quant_moe_forward if quant else mo.moe_forward
    args = (experts,) if quant else experts
    want = fn(x, gw, *args, K, return_router_info=info, backend="torch", **ROUTING, expert_bias=tensors[2])
    if not info:
        got, want = (got, {}), (want, {})
    assert torch.equal(got[0], want[0])
    assert got[1].keys() == want[1].keys()
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k
    spec = inference_op._spec(K, "swiglu", info, "torch", kind, False,
                              tuple((k, routing[k] if k != "router_dtype" else "float32")
                                    for k in ROUTING_SCALARS))
    torch.library.opcheck(torch.ops.mojo.moe_inference.default, (x, list(tensors), spec),
                          test_utils=("test_schema", "test_faketensor"))


@gpu
def test_compiled_inference_calls_replay_graphs(monkeypatch):
    x, gw, w13, w2, bias = _layer(2)
    fn = torch.compile(lambda inp: _fwd(inp, gw, w13, w2, bias, return_router_info=True), fullgraph=True)
    outs = [fn(x * i) for i in range(1, 5)]
    for i, (y, info) in enumerate(outs, start=1):
        y_ref, info_ref = _no_graphs(monkeypatch, lambda: _fwd(x * i, gw, w13, w2, bias, return_router_info=True))
        assert torch.equal(y, y_ref)
        assert all(torch.equal(info[k], info_ref[k]) for k in info_ref)
    assert eager_graphs.stats()["replays"] >= 2


@pytest.mark.parametrize("info", [True, False])
def test_compiled_inference_traces_one_op(monkeypatch, info):
    """The trace-time decision, the constant spec and the fake outputs under torch.compile(fullgraph)
    (on the CPU through the interpreter; on CUDA the op's eager body also replays graphs)."""
    from mojo_opset.functional import inference_op

    pytest.importorskip("triton")
    monkeypatch.setattr(inference_op, "DEVICES", ("cuda", "cpu"))
    calls = []
    real = inference_op._forward[0]
    monkeypatch.setattr(inference_op, "_forward", [lambda *a, **k: calls.append(1) or real(*a, **k)])
    x, gw, w13, w2, bias = _layer(3, device="cpu", dtype=torch.float32)
    fwd = lambda inp: _fwd(inp, gw, w13, w2, bias, return_router_info=info)   # noqa: E731
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(fwd, fullgraph=True)(x)
        want = fwd(x)
    assert calls, "the compiled call did not go through the op"
    got, want = (got, want) if info else ((got, {}), (want, {}))
    assert torch.equal(got[0], want[0])
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k
    monkeypatch.setenv("MOJO_EAGER_GRAPHS", "0")
    calls.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fwd, fullgraph=True)(x)
    assert not calls


def test_the_memory_budget_admits_larger_calls(monkeypatch):
    from mojo_opset.functional.forward import _token_bytes

    monkeypatch.delenv("MOJO_EAGER_GRAPH_MB", raising=False)
    assert eager_graphs.budget_bytes() == eager_graphs.BUDGET_MB << 20
    # Qwen3-30B-A3B's shape (H 2048, I 768, K 8), bf16: 48 KiB per token
    x = torch.empty(1, 2048, dtype=torch.bfloat16)
    w13 = torch.empty(1, 2 * 768, 2048, dtype=torch.bfloat16)
    per_token = _token_bytes(x, w13, 8)
    assert per_token == (8 * (768 + 2048) + 2048) * 2
    assert eager_graphs.within_budget(eager_graphs.MAX_TOKENS, 1 << 40)      # decode sizes always
    assert eager_graphs.within_budget(2048, per_token)                       # ~100 MB of activations
    assert not eager_graphs.within_budget(8192, per_token)
    monkeypatch.setenv("MOJO_EAGER_GRAPH_MB", "0")
    assert not eager_graphs.within_budget(eager_graphs.MAX_TOKENS + 1, 1)
    assert eager_graphs.within_budget(eager_graphs.MAX_TOKENS, 1 << 40)
    monkeypatch.setenv("MOJO_EAGER_GRAPH_MB", "lots")
    with pytest.raises(ValueError, match="MOJO_EAGER_GRAPH_MB"):
        eager_graphs.budget_bytes()
    monkeypatch.setenv("MOJO_EAGER_GRAPH_MB", "-1")
    with pytest.raises(ValueError, match="MOJO_EAGER_GRAPH_MB"):
        eager_graphs.budget_bytes()


@gpu
def test_a_larger_call_within_the_budget_is_replayed(monkeypatch):
    monkeypatch.setenv("MOJO_EAGER_GRAPH_MB", "64")
    x, gw, w13, w2, bias = _layer(1024)
    outs = [_fwd(x * (i + 1), gw, w13, w2, bias) for i in range(3)]      # eager, capture, replay
    assert eager_graphs.stats()["replays"] == 1
    for i, y in enumerate(outs):
        assert torch.equal(y, _no_graphs(monkeypatch, lambda: _fwd(x * (i + 1), gw, w13, w2, bias)))
    eager_graphs.clear()
    monkeypatch.setenv("MOJO_EAGER_GRAPH_MB", "0")
    for i in range(3):
        _fwd(x, gw, w13, w2, bias)
    assert eager_graphs.stats()["replays"] == 0
