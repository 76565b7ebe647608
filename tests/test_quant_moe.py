"""quant_moe_forward (SPEC §3.6) against the float MoE and an independent float64 emulation; routing
options, forced ids, shared experts, dispatch and bad input."""
import dataclasses
import pytest
import torch
import torch.nn.functional as F

import mojo_opset as mo
from mojo_opset.reference.shared import shared_experts

A8 = ("w8a8_int8", "w4a8_int4", "w8a8_fp8_block")
A16 = ("w8a16_int8", "w4a16_int4")
FP8 = torch.float8_e4m3fn


def _layer(E=4, I=128, H=256, T=24, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    gw = torch.randn(E, H, generator=g) * H ** -0.5
    x = torch.randn(T, H, generator=g)
    return x.to(dtype), gw.to(dtype), w13.to(dtype), w2.to(dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------- an independent emulation

def _fake_quant_tokens(a, act):
    """Per-token (fp8: per 128 columns) quantize-dequantize, as SPEC §3.6 defines it; also the scales."""
    a = a.float()
    if act == "int8":
        s = a.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        return torch.round(a / s).clamp(-127, 127).double() * s.double(), s.squeeze(-1)
    M, K = a.shape
    Kp = -(-K // 128) * 128
    g = F.pad(a, (0, Kp - K)).reshape(M, -1, 128)
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448
    codes = (g / s).clamp(-448, 448).to(FP8).double()
    return (codes * s.double()).reshape(M, Kp)[:, :K], s.amax(1).squeeze(-1)


def emulate(x, ids, weights, q):
    """float64 emulation: dequantized weights, fake-quantized activations, fp32 where SPEC rounds."""
    act = {"w8a8_int8": "int8", "w4a8_int4": "int8", "w8a8_fp8_block": "fp8"}[q.scheme]
    w13, w2 = (w.double() for w in q.dequantize())
    out = torch.zeros(x.shape, dtype=torch.float64)
    s_a_max = 0.0
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            xq, _ = _fake_quant_tokens(x[t:t + 1], act)
            h = (xq @ w13[e].T).float()
            g, u = h.chunk(2, -1)
            a = F.silu(g) * u
            aq, s_a = _fake_quant_tokens(a, act)
            s_a_max = max(s_a_max, float(s_a.max()))
            out[t] += float(weights[t, j]) * (aq @ w2[e].T).float().double()[0]
    return out, s_a_max


@pytest.mark.parametrize("scheme", A8)
def test_a8_matches_float64_emulation(scheme):
    x, gw, w13, w2 = _layer(T=16)
    q = mo.quantize_experts(w13, w2, scheme)
    y, info = mo.quant_moe_forward(x, gw, q, 2, return_router_info=True)
    want, s_a_max = emulate(x, info["topk_ids"], info["topk_weights"], q)
    # Bound: fp32 roundings (1e-5 of max|y|), plus one re-quantized SwiGLU code that may land on the
    # other side of a .5 tie when fp32 and fp64 disagree in the last bit: at most s_a * max|w2|.
    w2_max = q.dequantize()[1].abs().max().item()
    err = (y.double() - want).abs()
    tight = 1e-5 * want.abs().max().item()
    assert err.max().item() <= tight + s_a_max * w2_max, err.max()
    assert (err > tight).double().mean() < 0.01          # and such ties are rare


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", A16)
def test_a16_equals_moe_forward_on_dequantized_weights(scheme, dtype):
    """Weight-only: dequantize (fp32), cast to x's dtype, the float reference's ops: bitwise equal."""
    x, gw, w13, w2 = _layer(dtype=dtype)
    q = mo.quantize_experts(w13, w2, scheme)
    d13, d2 = q.dequantize(dtype)
    assert torch.equal(mo.quant_moe_forward(x, gw, q, 2), mo.moe_forward(x, gw, d13, d2, 2))


# stated bounds, as relative Frobenius errors (measured over seeds 0-3 with these shapes: int8
# activations 0.016-0.018, fp8 0.040-0.044 against the dequantized weights; against the original
# weights int8 0.012 (a16) / 0.021 (a8), int4 0.20-0.21, fp8 0.060-0.066)
VS_DEQUANT = {"w8a8_int8": 0.03, "w4a8_int4": 0.03, "w8a8_fp8_block": 0.07}
VS_ORIGINAL = {"w8a8_int8": 0.035, "w4a8_int4": 0.3, "w8a16_int8": 0.02, "w4a16_int4": 0.3, "w8a8_fp8_block": 0.1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", mo.QUANT_SCHEMES)
def test_against_float_moe(scheme, dtype):
    x, gw, w13, w2 = _layer(seed=5, dtype=dtype)
    q = mo.quantize_experts(w13, w2, scheme)
    y = mo.quant_moe_forward(x, gw, q, 2)
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
    slack = 0.01 if dtype == torch.bfloat16 else 0.0     # bf16 rounding of activations and outputs
    d13, d2 = q.dequantize(dtype)
    if scheme in VS_DEQUANT:
        assert _rel(y, mo.moe_forward(x, gw, d13, d2, 2)) <= VS_DEQUANT[scheme] + slack
    assert _rel(y, mo.moe_forward(x, gw, w13, w2, 2)) <= VS_ORIGINAL[scheme] + slack


def test_int4_custom_group_is_more_accurate():
    x, gw, w13, w2 = _layer()
    ref = mo.moe_forward(x, gw, w13, w2, 2)
    e128 = _rel(mo.quant_moe_forward(x, gw, mo.quantize_experts(w13, w2, "w4a16_int4"), 2), ref)
    e32 = _rel(mo.quant_moe_forward(x, gw, mo.quantize_experts(w13, w2, "w4a16_int4", group_size=32), 2), ref)
    assert e32 < e128


def test_fp8_hidden_not_multiple_of_128():
    x, gw, w13, w2 = _layer(H=200, I=128, T=8)
    q = mo.quantize_experts(w13, w2, "w8a8_fp8_block")
    assert q.w13_scale.shape == (4, 2, 2) and q.w2_scale.shape == (4, 2, 1)
    y, info = mo.quant_moe_forward(x, gw, q, 2, return_router_info=True)
    want, s_a_max = emulate(x, info["topk_ids"], info["topk_weights"], q)
    assert (y.double() - want).abs().max() <= 1e-5 * want.abs().max() + s_a_max * q.dequantize()[1].abs().max()


# --------------------------------------------------------------------------- routing, forced ids, shared

@pytest.mark.parametrize("scheme", ["w4a8_int4", "w8a8_fp8_block"])
def test_forced_ids(scheme):
    x, gw, w13, w2 = _layer(E=8, T=12)
    q = mo.quantize_experts(w13, w2, scheme)
    y, info = mo.quant_moe_forward(x, gw, q, 2, return_router_info=True)
    same = mo.quant_moe_forward(x, gw, q, 2, forced_expert_ids=info["topk_ids"].long())
    assert torch.equal(same, y)                           # forced == natural: bit-identical
    forced = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(t))[:2] for t in range(12)])
    yf, infof = mo.quant_moe_forward(x, gw, q, 2, forced_expert_ids=forced, return_router_info=True)
    assert torch.equal(infof["topk_ids"].long(), forced)
    scores = torch.softmax(x.float() @ gw.float().T, -1)
    assert torch.allclose(infof["topk_weights"], scores.gather(1, forced))
    want, s_a_max = emulate(x, forced, infof["topk_weights"], q)
    assert (yf.double() - want).abs().max() <= 1e-5 * want.abs().max() + s_a_max * q.dequantize()[1].abs().max()
    assert not torch.allclose(yf, y)
    with pytest.raises(ValueError, match="forced_expert_ids must lie in"):
        mo.quant_moe_forward(x, gw, q, 2, forced_expert_ids=forced + 8)


def test_routing_options_match_float_moe():
    x, gw, w13, w2 = _layer(E=8, T=20)
    q = mo.quantize_experts(w13, w2, "w8a16_int8")
    d13, d2 = q.dequantize()
    kw = dict(score_func="sigmoid", route_norm=True, route_scale=2.5, expert_bias=torch.linspace(-0.1, 0.1, 8),
              num_expert_groups=4, num_limited_groups=2, group_score="top2_sum",
              gate_bias=torch.full((8,), 0.01), return_router_info=True)
    y, info = mo.quant_moe_forward(x, gw, q, 3, **kw)
    yr, infor = mo.moe_forward(x, gw, d13, d2, 3, **kw)
    assert torch.equal(y, yr)
    for k in ("topk_ids", "topk_weights", "scores", "tokens_per_expert"):
        assert torch.equal(info[k], infor[k])


@pytest.mark.parametrize("scheme", ["w8a8_int8", "w4a16_int4"])
def test_shared_experts(scheme):
    x, gw, w13, w2 = _layer(T=10)
    g = torch.Generator().manual_seed(9)
    sw13, sw2 = torch.randn(64, 256, generator=g) * 0.06, torch.randn(256, 32, generator=g) * 0.2
    sgate = torch.randn(1, 256, generator=g) * 0.06
    q = mo.quantize_experts(w13, w2, scheme)
    routed = mo.quant_moe_forward(x, gw, q, 2)
    y = mo.quant_moe_forward(x, gw, q, 2, shared_w13=sw13, shared_w2=sw2, shared_gate=sgate)
    assert torch.equal(y, routed + shared_experts(x, sw13, sw2, sgate))
    with pytest.raises(ValueError, match="shared_w13 and shared_w2 must be given together"):
        mo.quant_moe_forward(x, gw, q, 2, shared_w13=sw13)


def test_shapes_empty_and_nan():
    x, gw, w13, w2 = _layer(T=6)
    for scheme in mo.QUANT_SCHEMES:
        q = mo.quantize_experts(w13, w2, scheme)
        y3 = mo.quant_moe_forward(x.reshape(2, 3, 256), gw, q, 2)
        assert y3.shape == (2, 3, 256) and torch.equal(y3.reshape(6, 256), mo.quant_moe_forward(x, gw, q, 2))
        empty = mo.quant_moe_forward(x[:0], gw, q, 2)
        assert empty.shape == (0, 256)
        strided = x.t().contiguous().t()   # same values, non-contiguous (the router GEMM may round differently)
        assert torch.allclose(mo.quant_moe_forward(strided, gw, q, 2), mo.quant_moe_forward(x, gw, q, 2),
                              rtol=1e-5, atol=1e-6)
        xn = x.clone()
        xn[1, 5] = float("nan")
        yn = mo.quant_moe_forward(xn, gw, q, 2, forced_expert_ids=torch.tensor([[0, 1]] * 6))
        yc = mo.quant_moe_forward(x, gw, q, 2, forced_expert_ids=torch.tensor([[0, 1]] * 6))
        assert torch.isnan(yn[1]).all(), scheme           # the NaN token's output is NaN ...
        assert torch.equal(yn[[0, 2, 3, 4, 5]], yc[[0, 2, 3, 4, 5]]), scheme   # ... the others are untouched


def test_autograd_reaches_the_router():
    x, gw, w13, w2 = _layer(T=8)
    for scheme in ("w8a8_int8", "w8a16_int8"):
        q = mo.quantize_experts(w13, w2, scheme)
        g = gw.clone().requires_grad_(True)
        xx = x.clone().requires_grad_(True)
        mo.quant_moe_forward(xx, g, q, 2).square().sum().backward()
        assert g.grad is not None and g.grad.abs().sum() > 0
        if scheme == "w8a16_int8":                        # weight-only: x's gradient flows through the experts
            assert xx.grad.abs().sum() > 0


# --------------------------------------------------------------------------- dispatch

class _QuantDemo(mo.Backend):
    name = "quantdemo"
    device_types = ("cpu",)

    def __init__(self):
        self.calls = []

    def load(self):
        def forward(call):
            self.calls.append(call)
            from mojo_opset.quant import quant_experts_reference
            return quant_experts_reference(call.x, call.topk_ids, call.topk_weights, call.qexperts) * 2

        def reasons(call):
            return ["fp8 not served"] if call.qexperts.scheme == "w8a8_fp8_block" else []

        return {"quant_moe_forward": mo.op_impl("quant_moe_forward", forward, reasons)}


def test_dispatch_reference_backend_and_fallback():
    x, gw, w13, w2 = _layer(T=6)
    q = mo.quantize_experts(w13, w2, "w8a8_int8")
    y = mo.quant_moe_forward(x, gw, q, 2)
    assert mo.last_served("quant_moe_forward")["served_by"] == "reference"
    demo = _QuantDemo()
    mo.register_backend(demo)
    try:
        yk = mo.quant_moe_forward(x, gw, q, 2, backend="quantdemo")
        assert mo.last_served("quant_moe_forward")["served_by"] == "kernel"
        assert torch.equal(yk, 2 * y)
        call = demo.calls[-1]
        assert {f.name for f in dataclasses.fields(call)} == {"x", "topk_ids", "topk_weights", "qexperts", "activation",
                                                                  "deterministic"}
        assert call.qexperts is q and call.topk_ids.dtype == torch.int32 and call.activation == "swiglu"
        qf = mo.quantize_experts(w13, w2, "w8a8_fp8_block")
        yf = mo.quant_moe_forward(x, gw, qf, 2, backend="quantdemo")
        assert mo.last_served("quant_moe_forward") == {"backend": "quantdemo", "served_by": "fallback",
                                                       "reasons": ["fp8 not served"]}
        assert torch.equal(yf, mo.quant_moe_forward(x, gw, qf, 2))
        with mo.strict(), pytest.raises(mo.StrictFallbackError, match="fp8 not served"):
            mo.quant_moe_forward(x, gw, qf, 2, backend="quantdemo")
        with mo.use_backend("quantdemo", ops="quant_moe_forward"):
            assert torch.equal(mo.quant_moe_forward(x, gw, q, 2), 2 * y)
    finally:
        mo.unregister_backend("quantdemo")


def test_env_var_selects_the_backend(monkeypatch):
    x, gw, w13, w2 = _layer(T=4)
    q = mo.quantize_experts(w13, w2, "w4a8_int4")
    mo.register_backend(_QuantDemo())
    try:
        monkeypatch.setenv("MOJO_BACKEND_QUANT_MOE_FORWARD", "quantdemo")
        mo.quant_moe_forward(x, gw, q, 2)
        assert mo.last_served("quant_moe_forward")["backend"] == "quantdemo"
    finally:
        mo.unregister_backend("quantdemo")


# --------------------------------------------------------------------------- bad input

def test_bad_arguments():
    x, gw, w13, w2 = _layer(T=4)
    q = mo.quantize_experts(w13, w2, "w8a8_int8")
    with pytest.raises(TypeError, match="q must be a mojo_opset.QuantizedExperts"):
        mo.quant_moe_forward(x, gw, (w13, w2), 2)
    with pytest.raises(ValueError, match="q must hold 8 experts"):
        mo.quant_moe_forward(x, torch.randn(8, 256), q, 2)
    with pytest.raises(ValueError, match="q's hidden size must equal x.shape"):
        mo.quant_moe_forward(x[:, :128], gw[:, :128], q, 2)
    with pytest.raises(ValueError, match="q is on meta"):
        mo.quant_moe_forward(x, gw, q.to("meta"), 2)
    with pytest.raises(TypeError, match="x must have dtype"):
        mo.quant_moe_forward(x.to(torch.int32), gw, q, 2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mo.quant_moe_forward(x.numpy(), gw, q, 2)
    with pytest.raises(ValueError, match="activation must be one of"):
        mo.quant_moe_forward(x, gw, q, 2, activation="gelu")
    with pytest.raises(ValueError, match="top_k must satisfy"):
        mo.quant_moe_forward(x, gw, q, 5)
    with pytest.raises(ValueError, match="ep_mode must be one of"):
        mo.quant_moe_forward(x, gw, q, 2, ep_mode="ring")
    with pytest.raises(TypeError, match="gate_weight must have dtype"):
        mo.quant_moe_forward(x, gw.to(torch.int64), q, 2)
