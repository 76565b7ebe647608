"""Weight/activation formats of the quantized MoE (SPEC §3.6): packing, scales, rounding, round trips,
exact accumulation, and the QuantizedExperts container."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset.quant import pack_int4, unpack_int4
from mojo_opset.quant.activations import quantize_tokens_fp8, quantize_tokens_int8
from mojo_opset.quant.matmul import int_group_sums, linear_fp8_block, linear_w4a8, linear_w8a8
from mojo_opset.quant.weights import quantize_fp8_block, quantize_int4, quantize_int8

FP8 = torch.float8_e4m3fn


def _weights(E=2, I=128, H=256, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    return w13, w2


# --------------------------------------------------------------------------- int4 packing

def test_pack_int4_nibble_order_and_negatives():
    q = torch.tensor([[0, 1, -1, 7, -8, 3]], dtype=torch.int8)
    packed = pack_int4(q)
    # byte j = q[2j] in the low nibble | q[2j+1] in the high nibble, two's complement
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x10, 0x7F, 0x38]]
    assert torch.equal(unpack_int4(packed), q)


def test_unpack_int4_every_byte():
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = unpack_int4(b)
    lo, hi = codes[0::2].int(), codes[1::2].int()
    for v in range(256):
        l, h = v & 0xF, v >> 4
        assert lo[v] == (l - 16 if l >= 8 else l) and hi[v] == (h - 16 if h >= 8 else h)
    assert torch.equal(pack_int4(codes), b)


def test_pack_int4_errors():
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8, 0], dtype=torch.int8))
    with pytest.raises(TypeError, match="q must have dtype"):
        pack_int4(torch.zeros(2))
    with pytest.raises(TypeError, match="packed must have dtype"):
        unpack_int4(torch.zeros(2, dtype=torch.int8))


# --------------------------------------------------------------------------- hand-computed weight cases

def test_int8_scales_rounding_half_even_and_zero_row():
    w = torch.tensor([[[0.5, 1.5, 2.5, -2.5, 127.0, -3.5],
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       [63.5, -254.0, 0.0, 1.0, 3.0, 1.0]]])
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (1, 3)
    assert q[0, 0].tolist() == [0, 2, 2, -2, 127, -4]             # half to even: 0.5->0, 1.5->2, 2.5->2
    assert s[0, 0].item() == 1.0
    assert q[0, 1].tolist() == [0] * 6 and s[0, 1].item() == pytest.approx(1e-12 / 127)
    assert s[0, 2].item() == 2.0 and q[0, 2].tolist() == [32, -127, 0, 0, 2, 0]   # 31.75->32, 0.5->0, 1.5->2


def test_int4_groups_packing_rounding_and_zero_group():
    w = torch.tensor([[[7.0, 2.5, -7.0, -0.5, 0.0, 0.0],
                       [1.0, 0.25, 14.0, 3.0, -0.5, 0.0625]]])
    packed, s = quantize_int4(w, 2)
    assert s.shape == (1, 2, 3)
    # row 0: groups [7, 2.5] s=1 -> [7, 2]; [-7, -0.5] s=1 -> [-7, 0]; zero group -> codes 0
    assert s[0, 0].tolist()[:2] == [1.0, 1.0] and s[0, 0, 2].item() == pytest.approx(1e-12 / 7)
    assert unpack_int4(packed)[0, 0].tolist() == [7, 2, -7, 0, 0, 0]
    assert packed[0, 0].tolist() == [0x27, 0x09, 0x00]
    # row 1: s = 1/7 -> [7, 1.75->2]; s = 2 -> [7, 1.5->2]; s = 0.5/7 -> [-7, 0.875->1]
    assert unpack_int4(packed)[0, 1].tolist() == [7, 2, 7, 2, -7, 1]
    assert s[0, 1].tolist() == pytest.approx([1 / 7, 2.0, 0.5 / 7])


def test_fp8_block_scales_edges_and_rounding():
    w = torch.zeros(1, 200, 130)
    w[0, 0, 0] = 448.0              # block (0, 0): amax 448 -> scale 1
    w[0, 0, 1] = 17.0               # e4m3 neighbours 16, 18: tie -> even mantissa (16)
    w[0, 0, 2] = 19.0               # neighbours 18, 20: tie -> 20
    w[0, 150, 129] = -3.0           # edge block (1, 1) holds rows 128..199, columns 128..129
    q, s = quantize_fp8_block(w)
    assert q.dtype == FP8 and q.shape == (1, 200, 130) and s.shape == (1, 2, 2)
    assert s[0, 0, 0].item() == 1.0
    assert q[0, 0, :3].float().tolist() == [448.0, 16.0, 20.0]
    assert s[0, 1, 1].item() == pytest.approx(3.0 / 448) and q[0, 150, 129].float().item() == -448.0
    assert s[0, 0, 1].item() == pytest.approx(1e-12 / 448) and s[0, 1, 0].item() == pytest.approx(1e-12 / 448)
    assert torch.isfinite(s).all() and q.float().abs().max() <= 448


def test_activation_quantization_hand_cases():
    x = torch.tensor([[127.0, 0.5, 1.5, -0.5, 2.5, -127.0], [0.0] * 6])
    q, s = quantize_tokens_int8(x)
    assert q.dtype == torch.int8 and s.tolist()[0] == 1.0
    assert q[0].tolist() == [127, 0, 2, 0, 2, -127]
    assert q[1].tolist() == [0] * 6 and s[1].item() == pytest.approx(1e-12 / 127)
    xf = torch.zeros(2, 130)
    xf[0, 0], xf[0, 1], xf[0, 129] = 448.0, 17.0, 2.0
    qf, sf = quantize_tokens_fp8(xf)
    assert qf.dtype == FP8 and qf.shape == (2, 256) and sf.shape == (2, 2)
    assert sf[0].tolist() == pytest.approx([1.0, 2.0 / 448])
    assert qf[0, :2].float().tolist() == [448.0, 16.0] and qf[0, 129].float().item() == 448.0
    assert (qf[:, 130:].float() == 0).all()


def test_activation_quantization_nan_row_keeps_codes_finite():
    x = torch.tensor([[1.0, float("nan"), 2.0], [1.0, float("inf"), 2.0], [1.0, -1.0, 0.5]])
    q, s = quantize_tokens_int8(x)
    assert not torch.isfinite(s[:2]).any() and torch.isfinite(s[2])
    assert q[2].tolist() == [127, -127, 64]                      # 63.5 -> 64 (half to even)


# --------------------------------------------------------------------------- round trips and scales

@pytest.mark.parametrize("scheme", mo.QUANT_SCHEMES)
def test_round_trip_bounds(scheme):
    w13, w2 = _weights()
    q = mo.quantize_experts(w13, w2, scheme)
    d13, d2 = q.dequantize()
    assert d13.shape == w13.shape and d2.shape == w2.shape and d13.dtype == torch.float32
    for w, d, s, name in ((w13, d13, q.w13_scale, "w13"), (w2, d2, q.w2_scale, "w2")):
        N, K = w.shape[1:]
        if "int8" in scheme:
            step = s.unsqueeze(-1).expand_as(w)
            assert torch.allclose(s, w.abs().amax(-1) / 127, rtol=1e-6, atol=0)
        elif "int4" in scheme:
            step = s.repeat_interleave(128, -1)
            amax = w.reshape(*w.shape[:2], K // 128, 128).abs().amax(-1)
            assert torch.allclose(s, amax / 7, rtol=1e-6, atol=0)
        else:
            step = s.repeat_interleave(128, -2)[:, :N].repeat_interleave(128, -1)[:, :, :K]
            amax = w.reshape(-1, N // 128, 128, K // 128, 128).abs().amax(dim=(2, 4))
            assert torch.allclose(s, amax / 448, rtol=1e-6, atol=0)
        err = (w - d).abs() / step                      # error in units of the scale
        if "fp8" in scheme:
            # e4m3: 3 mantissa bits -> half a unit is 2^-4 of the value, 2^-10 in the subnormals
            bound = torch.maximum((w / step).abs() * 2.0 ** -4, torch.full_like(w, 2.0 ** -10))
            assert (err <= bound * (1 + 1e-5) + 1e-6).all(), name
        else:
            assert err.max() <= 0.5 + 1e-5, name        # round to nearest: at most half a step
            assert err.max() > 0.4, name                 # (and the rounding really happens)


@pytest.mark.parametrize("scheme", mo.QUANT_SCHEMES)
def test_codes_dtypes_shapes(scheme):
    w13, w2 = _weights(E=3, I=128, H=384, dtype=torch.bfloat16)
    q = mo.quantize_experts(w13, w2, scheme)
    E, I, H = 3, 128, 384
    code = {"int8": torch.int8, "int4": torch.uint8, "fp8": FP8}[scheme.split("_")[1]]
    assert q.w13_q.dtype == code and q.w2_q.dtype == code
    pack = 2 if code == torch.uint8 else 1
    assert q.w13_q.shape == (E, 2 * I, H // pack) and q.w2_q.shape == (E, H, I // pack)
    want13, want2 = {
        torch.int8: ((E, 2 * I), (E, H)),
        torch.uint8: ((E, 2 * I, H // 128), (E, H, I // 128)),
        FP8: ((E, 2, 3), (E, 3, 1)),
    }[code]
    assert tuple(q.w13_scale.shape) == want13 and tuple(q.w2_scale.shape) == want2
    assert q.w13_scale.dtype == torch.float32
    assert q.w13_shape == (E, 2 * I, H) and q.w2_shape == (E, H, I)
    assert q.num_experts == E and q.intermediate_size == I and q.hidden_size == H
    d13, d2 = q.dequantize(torch.bfloat16)
    assert d13.dtype == torch.bfloat16 and d2.shape == (E, H, I)


def test_int4_custom_group_and_zero_expert():
    w13, w2 = _weights(E=2, I=64, H=96)
    w13[1] = 0
    q = mo.quantize_experts(w13, w2, "w4a16_int4", group_size=32)
    assert q.group_size == 32 and q.w13_scale.shape == (2, 128, 3) and q.w2_scale.shape == (2, 96, 2)
    d13, _ = q.dequantize()
    assert torch.equal(d13[1], torch.zeros_like(d13[1])) and torch.isfinite(q.w13_scale).all()


# --------------------------------------------------------------------------- exact accumulation

def test_int_group_sums_exact_at_the_limits():
    g = torch.Generator().manual_seed(1)
    M, N, K = 3, 5, 5000                     # K > 1032: several exact fp32 chunks per channel
    a = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    a[0] = 127
    b[0] = -128                              # the largest products: a long run of -16256
    exact = a.long() @ b.long().T
    assert torch.equal(int_group_sums(a, b, K, 127 * 128)[..., 0], exact)
    assert exact[0, 0] == -16256 * K         # beyond 2**24: a plain fp32 dot would round
    per_group = int_group_sums(a, b, 1000, 127 * 128)
    assert torch.equal(per_group.sum(-1), exact)
    assert torch.equal(per_group[..., 1], a[:, 1000:2000].long() @ b[:, 1000:2000].long().T)


def test_linear_w8a8_and_w4a8_formulas():
    g = torch.Generator().manual_seed(2)
    xq = torch.randint(-127, 128, (4, 256), generator=g, dtype=torch.int8)
    sx = torch.rand(4, generator=g) + 0.5
    w8 = torch.randint(-127, 128, (6, 256), generator=g, dtype=torch.int8)
    s8 = torch.rand(6, generator=g) + 0.5
    want = (xq.long() @ w8.long().T).float() * sx[:, None] * s8
    assert torch.equal(linear_w8a8(xq, sx, w8, s8), want)
    w4 = torch.randint(-8, 8, (6, 256), generator=g, dtype=torch.int8)
    s4 = torch.rand(6, 4, generator=g) + 0.5
    acc = torch.stack([xq[:, i * 64:(i + 1) * 64].long() @ w4[:, i * 64:(i + 1) * 64].long().T
                       for i in range(4)], -1)
    want4 = (acc.double() * s4.double()).sum(-1) * sx.double()[:, None]
    # fp32 scaling of exact group sums: a few fp32 roundings of the magnitude sum
    mag = (acc.double().abs() * s4.double()).sum(-1) * sx.double()[:, None]
    assert ((linear_w4a8(xq, sx, w4, s4, 64).double() - want4).abs() <= 4 * 2.0 ** -24 * mag).all()


def test_linear_fp8_block_exact_block_sums():
    g = torch.Generator().manual_seed(3)
    M, N, K = 3, 130, 300
    xq = (torch.randn(M, 384, generator=g) * 100).clamp(-448, 448).to(FP8)
    xq[:, K:] = 0
    wq = (torch.randn(N, K, generator=g) * 100).clamp(-448, 448).to(FP8)
    xq[0, :5] = torch.tensor([448.0, 2 ** -9, -2 ** -9, 448.0, 0.001953125]).to(FP8)
    # e4m3 values are multiples of 2^-9: scaled by 2^9 they are integers, so int64 gives the exact sums
    xi = (xq.double() * 512).long()[:, :K]
    wi = (wq.double() * 512).long()
    exact = (xi @ wi.T).double() / 2 ** 18
    ones_x, ones_w = torch.ones(M, 3), torch.ones(2, 3)
    assert torch.equal(linear_fp8_block(xq, ones_x, wq, ones_w), exact.float())
    sx = torch.rand(M, 3, generator=g) + 0.5
    sw = torch.rand(2, 3, generator=g) + 0.5
    blocks = torch.stack([(xi[:, b * 128:(b + 1) * 128] @ wi[:, b * 128:(b + 1) * 128].T).double() / 2 ** 18
                          for b in range(3)], -1)
    want = (blocks * sx.double()[:, None, :] * sw.double().repeat_interleave(128, 0)[:N]).sum(-1)
    assert torch.equal(linear_fp8_block(xq, sx, wq, sw), want.float())


# --------------------------------------------------------------------------- the container

def test_from_tensors_round_trip_and_scale_dtype():
    w13, w2 = _weights()
    for scheme in mo.QUANT_SCHEMES:
        q = mo.quantize_experts(w13, w2, scheme)
        r = mo.QuantizedExperts.from_tensors(scheme, q.w13_q, q.w13_scale.double().half().float(), q.w2_q,
                                             q.w2_scale, group_size=q.group_size)
        assert r.group_size == q.group_size and r.w13_scale.dtype == torch.float32
        b = mo.QuantizedExperts.from_tensors(scheme, q.w13_q, q.w13_scale.bfloat16(), q.w2_q,
                                             q.w2_scale.bfloat16())
        assert b.w2_scale.dtype == torch.float32
        assert torch.equal(b.w2_scale, q.w2_scale.bfloat16().float())


def test_to_and_slice_experts():
    w13, w2 = _weights(E=4)
    q = mo.quantize_experts(w13, w2, "w4a8_int4")
    m = q.to("meta")
    assert m.device.type == "meta" and m.w13_q.dtype == torch.uint8 and m.w13_shape == q.w13_shape
    c = q.to("cpu")
    assert torch.equal(c.w13_q, q.w13_q) and c.scheme == q.scheme
    s = q.slice_experts(1, 3)
    assert s.num_experts == 2 and torch.equal(s.dequantize()[1], q.dequantize()[1][1:3])
    assert q.slice_experts(3, 3).num_experts == 0  # a rank that owns no experts under EP
    with pytest.raises(ValueError, match="slice_experts"):
        q.slice_experts(3, 2)
    assert "w4a8_int4" in repr(q) and q.nbytes() < w13.numel() + w2.numel()


# --------------------------------------------------------------------------- bad input

def _q(scheme="w8a8_int8", **kw):
    w13, w2 = _weights(**kw)
    return mo.quantize_experts(w13, w2, scheme)


@pytest.mark.parametrize("scheme, group, H, I, match", [
    ("nope", None, 256, 128, "scheme must be one of"),
    ("w4a16_int4", None, 255, 128, "must be even"),
    ("w4a8_int4", 1, 256, 127, "must be even"),
    ("w4a16_int4", None, 192, 128, "not a multiple of 128"),
    ("w4a8_int4", 48, 256, 128, "group_size must divide"),
    ("w4a8_int4", 0, 256, 128, "group_size must be >= 1"),
    ("w8a8_int8", 128, 256, 128, "group_size must be None for w8a8_int8"),
    ("w8a16_int8", 64, 256, 128, "per-output-channel"),
    ("w8a8_fp8_block", None, 256, 192, "multiple of 128"),
    ("w8a8_fp8_block", 64, 256, 128, "group_size must be None or 128"),
])
def test_quantize_bad_combinations(scheme, group, H, I, match):
    w13, w2 = _weights(E=1, I=I, H=H)
    with pytest.raises(ValueError, match=match):
        mo.quantize_experts(w13, w2, scheme, group_size=group)


def test_quantize_bad_inputs():
    w13, w2 = _weights(E=2)
    with pytest.raises(TypeError, match="w13 must have dtype"):
        mo.quantize_experts(w13.to(torch.int32), w2, "w8a8_int8")
    with pytest.raises(TypeError, match="w2 must be a torch.Tensor"):
        mo.quantize_experts(w13, None, "w8a8_int8")
    with pytest.raises(ValueError, match=r"w2 must have shape \[E, H, I\] = \[2, 256, 128\]"):
        mo.quantize_experts(w13, w2[:, :, :64], "w8a8_int8")
    with pytest.raises(ValueError, match="even number of rows"):
        mo.quantize_experts(w13[:, 1:], w2, "w8a8_int8")
    with pytest.raises(ValueError, match="w13 must have 3 dimensions"):
        mo.quantize_experts(w13[0], w2, "w8a8_int8")
    bad = w13.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="w13 holds NaN or Inf"):
        mo.quantize_experts(bad, w2, "w8a8_int8")
    with pytest.raises(ValueError, match="scheme must be one of"):
        mo.quantize_experts(w13, w2, None)


def test_from_tensors_bad_shapes_and_dtypes():
    q = _q("w4a8_int4")
    ft = mo.QuantizedExperts.from_tensors
    with pytest.raises(ValueError, match=r"w13_scale must have shape \[2, 256, 2\].*means group_size=64"):
        ft("w4a8_int4", q.w13_q, q.w13_scale.repeat_interleave(2, -1), q.w2_q, q.w2_scale)
    with pytest.raises(ValueError, match=r"w2_scale must have shape \[2, 256, 1\]"):
        ft("w4a8_int4", q.w13_q, q.w13_scale, q.w2_q, q.w2_scale[:, :, :0])
    with pytest.raises(ValueError, match=r"w2_q must have shape"):
        ft("w4a8_int4", q.w13_q, q.w13_scale, q.w2_q[:, :128], q.w2_scale)
    with pytest.raises(TypeError, match="w13_q must have dtype in \\(uint8\\)"):
        ft("w4a8_int4", q.w13_q.to(torch.int8), q.w13_scale, q.w2_q, q.w2_scale)
    with pytest.raises(TypeError, match="w2_scale must have dtype"):
        ft("w4a8_int4", q.w13_q, q.w13_scale, q.w2_q, q.w2_scale.to(torch.int32))
    with pytest.raises(ValueError, match="finite, non-negative"):
        ft("w4a8_int4", q.w13_q, -q.w13_scale, q.w2_q, q.w2_scale)
    with pytest.raises(ValueError, match="group_size=64"):
        ft("w4a8_int4", q.w13_q, q.w13_scale, q.w2_q, q.w2_scale, group_size=64)
    q8 = _q("w8a8_int8")
    with pytest.raises(ValueError, match=r"w13_scale must have shape \[2, 256\]"):
        ft("w8a8_int8", q8.w13_q, q8.w13_scale[..., None], q8.w2_q, q8.w2_scale)
    with pytest.raises(ValueError, match="scheme must be one of"):
        ft("int8", q8.w13_q, q8.w13_scale, q8.w2_q, q8.w2_scale)
    qf = _q("w8a8_fp8_block")
    with pytest.raises(ValueError, match=r"w2_scale must have shape \[2, 2, 1\]"):
        ft("w8a8_fp8_block", qf.w13_q, qf.w13_scale, qf.w2_q, qf.w2_scale.transpose(1, 2))
    with pytest.raises(ValueError, match="one device"):
        mo.QuantizedExperts("w8a8_int8", q8.w13_q, q8.w13_scale.to("meta"), q8.w2_q, q8.w2_scale)
    with pytest.raises(TypeError, match="w13_scale must have dtype in \\(float32\\)"):
        mo.QuantizedExperts("w8a8_int8", q8.w13_q, q8.w13_scale.half(), q8.w2_q, q8.w2_scale)


# --------------------------------------------------------------------------- checkpoint conversions (docs)

def test_deepseek_v3_fp8_conversion_from_docs():
    E, I, H = 3, 128, 200
    w13, w2 = _weights(E=E, I=I, H=H)
    q = mo.quantize_experts(w13, w2, "w8a8_fp8_block")
    # a checkpoint's per-expert tensors: [out, in] fp8 weights and [ceil(out/128), ceil(in/128)] scale_inv
    sd = {}
    for e in range(E):
        pre = f"model.layers.0.mlp.experts.{e}."
        sd[pre + "gate_proj.weight"], sd[pre + "up_proj.weight"] = q.w13_q[e, :I], q.w13_q[e, I:]
        sd[pre + "gate_proj.weight_scale_inv"] = q.w13_scale[e, :1]
        sd[pre + "up_proj.weight_scale_inv"] = q.w13_scale[e, 1:]
        sd[pre + "down_proj.weight"], sd[pre + "down_proj.weight_scale_inv"] = q.w2_q[e], q.w2_scale[e]
    ex = lambda e, name, suffix: sd[f"model.layers.0.mlp.experts.{e}.{name}.{suffix}"]  # noqa: E731
    w13_q = torch.stack([torch.cat([ex(e, "gate_proj", "weight"), ex(e, "up_proj", "weight")]) for e in range(E)])
    w13_s = torch.stack([torch.cat([ex(e, "gate_proj", "weight_scale_inv"),
                                    ex(e, "up_proj", "weight_scale_inv")]) for e in range(E)])
    w2_q = torch.stack([ex(e, "down_proj", "weight") for e in range(E)])
    w2_s = torch.stack([ex(e, "down_proj", "weight_scale_inv") for e in range(E)])
    r = mo.QuantizedExperts.from_tensors("w8a8_fp8_block", w13_q, w13_s, w2_q, w2_s)
    for a, b in zip(r.dequantize(), q.dequantize()):
        assert torch.equal(a, b)
    # separately quantized gate and up halves give the same blocks as w13 quantized whole (I % 128 == 0)
    qg = mo.quantize_experts(torch.cat([w13[:, :I], w13[:, :I]], 1), w2, "w8a8_fp8_block")
    assert torch.equal(qg.w13_scale[:, :1], q.w13_scale[:, :1])


def test_int4_int32_words_conversion_from_docs():
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(-8, 8, (6, 64), generator=g, dtype=torch.int32)
    nib = (codes + 8).reshape(6, 8, 8)                 # unsigned nibbles, offset 8, eight per word
    words = torch.zeros(6, 8, dtype=torch.int64)
    for i in range(8):
        words |= nib[..., i].long() << (4 * i)         # lowest bits first
    packed_int32 = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    got = ((packed_int32.unsqueeze(-1) >> shifts) & 0xF).flatten(-2) - 8
    assert torch.equal(got, codes)
    assert torch.equal(unpack_int4(pack_int4(got.to(torch.int8))), codes.to(torch.int8))


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", mo.QUANT_SCHEMES)
def test_quantization_identical_on_cuda(scheme):
    """Codes and scales do not depend on the device (scales are correctly rounded divisions)."""
    w13, w2 = _weights(E=3, I=128, H=384)
    q, qc = mo.quantize_experts(w13, w2, scheme), mo.quantize_experts(w13.cuda(), w2.cuda(), scheme)
    bits = lambda t: t.view(torch.uint8) if t.dtype == FP8 else t  # noqa: E731
    for name in ("w13_q", "w13_scale", "w2_q", "w2_scale"):
        assert torch.equal(bits(getattr(qc, name)).cpu(), bits(getattr(q, name))), name
