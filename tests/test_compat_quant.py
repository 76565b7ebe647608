"""The original mojo_opset's quantized experts: conversion to QuantizedExperts (exact), activation
smoothing in the reference (against a naive computation of the original's math), MojoQuantExperts /
MojoQuantMoE loading the original's state dicts, kernels declining smoothing."""
import pytest
import torch
import torch.nn.functional as F

import mojo_opset as mo
from mojo_opset.compat import convert_quant_experts, quant_layout


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- the original's format, naively

def pack_rows(codes):
    """Signed int4 codes [..., N, K] -> the original's int8 [..., N/2, K]: row 2i low nibble, 2i+1 high."""
    u = codes.to(torch.int16) & 0xF
    return (u[..., 0::2, :] | (u[..., 1::2, :] << 4)).to(torch.uint8).view(torch.int8)


def quantize(w, group, fmt):
    """The original test-suite's weight quantizer: symmetric, amax/7 (int4) or amax/127 (int8),
    per output channel (group <= 0) or per group of input columns (the last group may be short)."""
    qmax = 7 if fmt == "int4" else 127
    K = w.shape[-1]
    g = K if group <= 0 else group
    codes, scales = [], []
    for c0 in range(0, K, g):
        part = w[..., c0:c0 + g]
        s = (part.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-12).bfloat16()
        codes.append(torch.clamp(torch.round(part / s.float()), -qmax - 1, qmax).to(torch.int8))
        scales.append(s)
    codes, scales = torch.cat(codes, -1), torch.cat(scales, -1)
    if group <= 0:
        scales = scales.squeeze(-1)
    return codes, scales


def dequant(codes, scales, group):
    K = codes.shape[-1]
    s = scales.float().unsqueeze(-1) if group <= 0 else scales.float()[..., torch.arange(K) // group]
    return codes.float() * s


def original_tensors(E, H, I, up, gu, down, gd, seed=0, smooth=True):
    """Codes (unpacked), the original's stored tensors and the smoothing multipliers."""
    g = _gen(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.05
    w2 = torch.randn(E, H, I, generator=g) * 0.05
    c13, s13 = quantize(w13, gu, up)
    c2, s2 = quantize(w2, gd, down)
    inv13 = (1.0 / (torch.rand(E, H, generator=g) + 0.5)) if smooth else torch.ones(E, H)
    inv2 = (1.0 / (torch.rand(E, I, generator=g) + 0.5)) if smooth else torch.ones(E, I)
    stored = {"up_proj_weight": pack_rows(c13) if up == "int4" else c13, "up_proj_weight_scale": s13,
              "down_proj_weight": pack_rows(c2) if down == "int4" else c2, "down_proj_weight_scale": s2,
              "up_proj_quantize.inv_smooth_scale": inv13, "down_proj_quantize.inv_smooth_scale": inv2}
    return dict(c13=c13, s13=s13, c2=c2, s2=s2, inv13=inv13, inv2=inv2, stored=stored)


def _dt(fmt):
    return "int4" if fmt == "int4" else torch.int8


def naive_quant_linear(x, inv_smooth, codes, scales, group):
    """The original's quantized linear: x * inv_smooth, per-token int8 (amax/127, in fp32), then the
    integer GEMM with the weight scales applied per group, summed in float64."""
    xs = x.float() * inv_smooth
    s = xs.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    q = torch.round(xs / s).clamp(-128, 127)
    w = dequant(codes, scales, group).double()
    return ((q.double() @ w.t()) * s.double()).float()


def naive_expert(x, d, e, dt):
    """One expert of the original's reference on rows x (dt: the output dtype); SwiGLU kept in fp32
    before the second quantization, as the original does."""
    I = d["c2"].shape[-1]
    h = naive_quant_linear(x, d["inv13"][e], d["c13"][e], d["s13"][e], d["gu"]).to(dt)
    a = F.silu(h[:, :I].float()) * h[:, I:].float()
    return naive_quant_linear(a, d["inv2"][e], d["c2"][e], d["s2"][e], d["gd"]).to(dt)


CONFIGS = [("int4", 32, "int4", 40), ("int4", 48, "int4", -1), (torch.int8, -1, torch.int8, -1),
           ("int4", -1, torch.int8, -1)]


# --------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("up, gu, down, gd", CONFIGS)
def test_conversion_is_exact(up, gu, down, gd):
    E, H, I = 3, 64, 80                      # int4 48 on H=64: groups of 48 and 16 (the last one short)
    d = original_tensors(E, H, I, "int4" if up == "int4" else "int8", gu, "int4" if down == "int4" else "int8", gd)
    st = d["stored"]
    q = convert_quant_experts(st["up_proj_weight"], st["up_proj_weight_scale"], st["down_proj_weight"],
                              st["down_proj_weight_scale"], up_weight_dtype=up, down_weight_dtype=down,
                              up_quant_group_size=gu, down_quant_group_size=gd,
                              up_inv_smooth_scale=st["up_proj_quantize.inv_smooth_scale"],
                              down_inv_smooth_scale=st["down_proj_quantize.inv_smooth_scale"])
    layout = quant_layout(H, I, up_weight_dtype=up, down_weight_dtype=down, up_quant_group_size=gu,
                          down_quant_group_size=gd)
    assert q.scheme == layout.scheme and q.group_size == layout.group_size
    assert q.scheme == ("w4a8_int4" if up == down == "int4" else "w8a8_int8")
    if q.scheme == "w4a8_int4":
        # the common group splits every original group: gcd(gcd(32, 64), gcd(40, 80)) = 8; gcd(16, 80) = 16
        assert q.group_size == {32: 8, 48: 16}[gu]
    w13, w2 = q.dequantize(torch.float32)
    assert torch.equal(w13, dequant(d["c13"], d["s13"], gu) * d["inv13"].unsqueeze(1))
    assert torch.equal(w2, dequant(d["c2"], d["s2"], gd) * d["inv2"].unsqueeze(1))
    assert torch.equal(q.w13_smooth, d["inv13"]) and torch.equal(q.w2_smooth, d["inv2"])


def test_conversion_drops_unit_smoothing_and_reads_uint8_codes():
    d = original_tensors(2, 16, 8, "int4", 8, "int4", 8, smooth=False)
    st = d["stored"]
    q = convert_quant_experts(st["up_proj_weight"].view(torch.uint8), st["up_proj_weight_scale"],
                              st["down_proj_weight"], st["down_proj_weight_scale"], up_weight_dtype="int4",
                              down_weight_dtype="int4", up_quant_group_size=8, down_quant_group_size=8,
                              up_inv_smooth_scale=st["up_proj_quantize.inv_smooth_scale"],
                              down_inv_smooth_scale=st["down_proj_quantize.inv_smooth_scale"])
    assert not q.has_smoothing and q.options() == {}
    assert torch.equal(mo.quant.unpack_int4(q.w13_q), d["c13"])


def test_conversion_errors_name_the_argument():
    with pytest.raises(NotImplementedError, match="up_weight_dtype=torch.int8 with up_quant_group_size=32"):
        quant_layout(64, 64, up_quant_group_size=32)
    with pytest.raises(NotImplementedError, match="down_quant_group_size=16"):
        quant_layout(64, 64, up_weight_dtype=torch.int8, down_weight_dtype="int4", down_quant_group_size=16)
    with pytest.raises(ValueError, match="up_weight_dtype"):
        quant_layout(64, 64, up_weight_dtype="int2")
    with pytest.raises(ValueError, match="even"):
        quant_layout(63, 64, up_weight_dtype="int4", down_weight_dtype="int4")
    d = original_tensors(2, 16, 8, "int4", 8, "int4", 8)
    st = d["stored"]
    with pytest.raises(ValueError, match="down_proj_weight_scale must have shape"):
        convert_quant_experts(st["up_proj_weight"], st["up_proj_weight_scale"], st["down_proj_weight"],
                              st["down_proj_weight_scale"][:, :3], up_weight_dtype="int4",
                              down_weight_dtype="int4", up_quant_group_size=8, down_quant_group_size=8)
    with pytest.raises(ValueError, match="up_inv_smooth_scale"):
        convert_quant_experts(st["up_proj_weight"], st["up_proj_weight_scale"], st["down_proj_weight"],
                              st["down_proj_weight_scale"], up_weight_dtype="int4", down_weight_dtype="int4",
                              up_quant_group_size=8, down_quant_group_size=8, up_inv_smooth_scale=torch.ones(2, 8))


# --------------------------------------------------------------------------- the smoothing field

def test_quantized_experts_smoothing_field():
    E, H, I = 4, 32, 16
    g = _gen(1)
    q0 = mo.quantize_experts(torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g), "w8a8_int8")
    s13, s2 = torch.rand(E, H, generator=g) + 0.5, torch.rand(E, I, generator=g) + 0.5
    q = mo.QuantizedExperts.from_tensors(q0.scheme, q0.w13_q, q0.w13_scale, q0.w2_q, q0.w2_scale,
                                         w13_smooth=s13.bfloat16(), w2_smooth=s2)
    assert q.w13_smooth.dtype == torch.float32 and q.has_smoothing
    assert q.options() == {"activation_smoothing": True} and "activation_smoothing" in repr(q)
    assert q.nbytes() == q0.nbytes() + 4 * E * (H + I)
    s = q.slice_experts(1, 3)
    assert torch.equal(s.w13_smooth, q.w13_smooth[1:3]) and torch.equal(s.w2_smooth, s2[1:3])
    assert torch.equal(q.to("cpu").w2_smooth, s2)
    m13, m2 = q.expert_smoothing(2)
    assert torch.equal(m13, s13.bfloat16().float()[2]) and torch.equal(m2, s2[2])
    assert q0.expert_smoothing(2) == (None, None)
    d13, _ = q.dequantize()
    assert torch.equal(d13, q0.dequantize()[0] * q.w13_smooth.unsqueeze(1))
    with pytest.raises(ValueError, match="w13_smooth must have shape"):
        mo.QuantizedExperts(q0.scheme, q0.w13_q, q0.w13_scale, q0.w2_q, q0.w2_scale, None, s13[:, :5])
    with pytest.raises(TypeError, match="w2_smooth"):
        mo.QuantizedExperts(q0.scheme, q0.w13_q, q0.w13_scale, q0.w2_q, q0.w2_scale, None, None, s2.half())
    with pytest.raises(ValueError, match="positive"):
        mo.QuantizedExperts.from_tensors(q0.scheme, q0.w13_q, q0.w13_scale, q0.w2_q, q0.w2_scale,
                                         w2_smooth=-s2)


@pytest.mark.parametrize("up, gu, down, gd", CONFIGS[:3])
def test_reference_with_smoothing_matches_the_original_math(up, gu, down, gd):
    E, H, I = 3, 64, 80
    d = original_tensors(E, H, I, "int4" if up == "int4" else "int8", gu, "int4" if down == "int4" else "int8", gd,
                         seed=2)
    d.update(gu=gu, gd=gd)
    st = d["stored"]
    ex = mo.MojoQuantExperts(E, H, I, up_quant_group_size=gu, up_weight_dtype=up, down_quant_group_size=gd,
                             down_weight_dtype=down)
    ex.load_state_dict(st)                       # strict: the original's keys and shapes
    counts = torch.tensor([4, 0, 5], dtype=torch.int32)
    x = torch.randn(9, H, generator=_gen(3))
    y = ex(x, counts)
    want = torch.cat([naive_expert(x[:4], d, 0, torch.float32), naive_expert(x[4:], d, 2, torch.float32)])
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)
    # the smoothing matters: without it the result moves far more than that
    q = ex.quantized_experts()
    plain = mo.QuantizedExperts(q.scheme, q.w13_q, q.w13_scale, q.w2_q, q.w2_scale, q.group_size)
    y_plain = mo.moe_quant_experts(x, torch.cumsum(counts, 0).int(), plain)
    assert (y_plain - want).abs().max() > 100 * (y - want).abs().max()


def test_a16_smoothing_equals_the_folded_float_weights():
    E, H, I = 2, 32, 16
    g = _gen(4)
    q0 = mo.quantize_experts(torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g), "w8a16_int8")
    q = mo.QuantizedExperts.from_tensors(q0.scheme, q0.w13_q, q0.w13_scale, q0.w2_q, q0.w2_scale,
                                         w13_smooth=torch.rand(E, H, generator=g) + 0.5,
                                         w2_smooth=torch.rand(E, I, generator=g) + 0.5)
    x = torch.randn(6, H, generator=g)
    ends = torch.tensor([2, 6], dtype=torch.int32)
    w13, w2 = q.dequantize()
    torch.testing.assert_close(mo.moe_quant_experts(x, ends, q), mo.moe_experts(x, ends, w13, w2),
                               atol=1e-4, rtol=1e-5)


class _QuantPlugin(mo.Backend):
    """Quantized experts through the reference, declaring no option: smoothing must be declined."""
    name = "compat_quant_plugin"
    device_types = ("cpu",)

    def load(self):
        def forward(call):
            return mo.moe_quant_experts(call.permuted_x, call.group_ends, call.qexperts, backend="torch")
        return {"moe_quant_experts": mo.op_impl("moe_quant_experts", forward)}


def test_kernels_that_lack_smoothing_decline_it():
    mo.register_backend(_QuantPlugin())
    try:
        d = original_tensors(2, 16, 8, "int4", 8, "int4", 8, seed=5)
        st = d["stored"]
        ex = mo.MojoQuantExperts._registry.get("compat_quant_plugin")(
            2, 16, 8, up_quant_group_size=8, up_weight_dtype="int4", down_quant_group_size=8,
            down_weight_dtype="int4")
        ex.load_state_dict(st)
        x, counts = torch.randn(3, 16), torch.tensor([1, 2], dtype=torch.int32)
        with torch.no_grad():
            ex(x, counts)
            rec = mo.last_served("moe_quant_experts")
            assert rec["served_by"] == "fallback" and "activation_smoothing" in " ".join(rec["reasons"])
            with mo.strict(), pytest.raises(mo.StrictFallbackError, match="activation_smoothing"):
                ex(x, counts)
            ex.load_state_dict({**st, "up_proj_quantize.inv_smooth_scale": torch.ones(2, 16),
                                "down_proj_quantize.inv_smooth_scale": torch.ones(2, 8)})
            mo.reset_stats()
            ex(x, counts)                            # unit smoothing is dropped: the plugin serves it
            assert mo.explain()["served"].get("moe_quant_experts/compat_quant_plugin/kernel") == 1
    finally:
        mo.unregister_backend("compat_quant_plugin")


# --------------------------------------------------------------------------- MojoQuantMoE / MojoQuantExperts modules

@pytest.mark.parametrize("up, gu, down, gd", CONFIGS[:3])
def test_quant_moe_loads_the_original_state_dict(up, gu, down, gd):
    E, K, H, I, T = 4, 2, 64, 80, 7
    d = original_tensors(E, H, I, "int4" if up == "int4" else "int8", gu, "int4" if down == "int4" else "int8", gd,
                         seed=6)
    d.update(gu=gu, gd=gd)
    gate = torch.randn(H, E, generator=_gen(7)) * 0.2
    state = {"gating.gate_weight": gate, **{f"experts.{k}": v for k, v in d["stored"].items()}}
    moe = mo.MojoQuantMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, quant_dtype=torch.int8,
                          up_quant_group_size=gu, up_weight_dtype=up, down_quant_group_size=gd,
                          down_weight_dtype=down)
    assert set(moe.state_dict()) == set(state)
    moe.load_state_dict(state)
    x = torch.randn(T, H, generator=_gen(8))
    y = moe(x)
    probs = torch.softmax(x @ gate, -1)
    ids = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :K]
    assert torch.equal(moe.last_topk_ids.long(), ids)
    w = probs.gather(1, ids)
    w = w / w.sum(-1, keepdim=True)
    want = torch.stack([sum(w[t, j] * naive_expert(x[t:t + 1], d, int(ids[t, j]), torch.float32)[0]
                            for j in range(K)) for t in range(T)])
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)
    q = convert_quant_experts(*(d["stored"][k] for k in ("up_proj_weight", "up_proj_weight_scale",
                                                          "down_proj_weight", "down_proj_weight_scale")),
                              up_weight_dtype=up, down_weight_dtype=down, up_quant_group_size=gu,
                              down_quant_group_size=gd, up_inv_smooth_scale=d["inv13"], down_inv_smooth_scale=d["inv2"])
    assert torch.equal(y, mo.quant_moe_forward(x, gate.t(), q, K, route_norm=True))


def test_quantized_experts_cache_and_pinned_dtypes():
    ex = mo.MojoQuantExperts(2, 16, 8, up_quant_group_size=8, up_weight_dtype="int4", down_quant_group_size=8,
                             down_weight_dtype="int4")
    assert ex.up_proj_weight.shape == (2, 8, 16) and ex.down_proj_weight.shape == (2, 8, 8)   # int4: rows halved
    assert ex.up_proj_weight_scale.shape == (2, 16, 2) and ex.up_proj_weight_scale.dtype == torch.bfloat16
    q1 = ex.quantized_experts()
    assert ex.quantized_experts() is q1
    d = original_tensors(2, 16, 8, "int4", 8, "int4", 8, seed=9)
    ex.load_state_dict(d["stored"])
    q2 = ex.quantized_experts()
    assert q2 is not q1 and torch.equal(q2.w13_smooth, d["inv13"])
    with torch.no_grad():
        ex.down_proj_quantize.inv_smooth_scale.mul_(2)
    assert torch.equal(ex.quantized_experts().w2_smooth, d["inv2"] * 2)
    ex.to(torch.float16)            # scales stay bf16 and smoothing fp32, the original's declared dtypes
    assert ex.up_proj_weight_scale.dtype == torch.bfloat16
    assert ex.up_proj_quantize.inv_smooth_scale.dtype == torch.float32
    with pytest.raises(ValueError, match="quant_dtype"):
        mo.MojoQuantExperts(2, 16, 8, quant_dtype=torch.float8_e4m3fn)
    with pytest.raises(NotImplementedError, match="quant_group_size"):
        mo.MojoQuantMoE(4, 2, 16, 8, up_quant_group_size=8)
