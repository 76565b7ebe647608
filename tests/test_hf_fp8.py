"""DeepSeek-V3 fp8 experts loaded from a Hugging Face-style state dict into QuantizedExperts, with
tensors produced here in the checkpoint's layout (float8_e4m3fn ``weight`` + ``weight_scale_inv``)."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset.hf import load_fp8_experts

PREFIX = "model.layers.3.mlp."


def _checkpoint(E=3, H=200, I=128, scale_dtype=torch.float32, seed=0):
    """A state dict as DeepSeek-V3 ships it, from fp8 block quantization of random weights; also the
    quantized experts the loader must reproduce."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    q = mo.quantize_experts(w13, w2, "w8a8_fp8_block")
    nb = -(-I // 128)
    sd = {f"{PREFIX}gate.weight": torch.randn(E, H, generator=g)}
    for e in range(E):
        parts = {"gate_proj": (q.w13_q[e, :I], q.w13_scale[e, :nb]), "up_proj": (q.w13_q[e, I:], q.w13_scale[e, nb:]),
                 "down_proj": (q.w2_q[e], q.w2_scale[e])}
        for name, (w, s) in parts.items():
            sd[f"{PREFIX}experts.{e}.{name}.weight"] = w.clone()
            sd[f"{PREFIX}experts.{e}.{name}.weight_scale_inv"] = s.to(scale_dtype).clone()
    return sd, q


def _hf_dequant(w, s):
    """What DeepSeek-V3's reference code computes: weight x weight_scale_inv per 128x128 block."""
    n, k = w.shape
    full = s.float().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return w.float() * full


def test_loads_codes_and_scales_unchanged():
    sd, q = _checkpoint()
    got = load_fp8_experts(sd, PREFIX)
    assert got.scheme == "w8a8_fp8_block" and got.w13_shape == q.w13_shape
    for name in ("w13_q", "w2_q"):
        assert torch.equal(getattr(got, name).view(torch.uint8), getattr(q, name).view(torch.uint8))
    for name in ("w13_scale", "w2_scale"):
        assert torch.equal(getattr(got, name), getattr(q, name))


def test_dequantizes_like_the_checkpoint_convention():
    sd, _ = _checkpoint(E=2, H=136, I=256)
    got = load_fp8_experts(sd, PREFIX.rstrip("."))          # the trailing dot is optional
    w13, w2 = got.dequantize(torch.float32)
    e = 1

    def proj(name):
        base = f"{PREFIX}experts.{e}.{name}."
        return _hf_dequant(sd[base + "weight"], sd[base + "weight_scale_inv"])

    gate, up, down = proj("gate_proj"), proj("up_proj"), proj("down_proj")
    assert torch.equal(w13[e], torch.cat([gate, up]))
    assert torch.equal(w2[e], down)


def test_forward_equals_the_quantized_experts():
    sd, q = _checkpoint(E=4, H=128, I=128, scale_dtype=torch.bfloat16)
    q = mo.QuantizedExperts.from_tensors("w8a8_fp8_block", q.w13_q, q.w13_scale.bfloat16(), q.w2_q,
                                         q.w2_scale.bfloat16())
    got = load_fp8_experts(sd, PREFIX)
    x = torch.randn(6, 128)
    gw = sd[f"{PREFIX}gate.weight"]
    y = mo.quant_moe_forward(x, gw, got, 2, backend="torch")
    assert torch.equal(y, mo.quant_moe_forward(x, gw, q, 2, backend="torch"))


def test_expert_subset_for_expert_parallelism():
    sd, q = _checkpoint(E=4)
    got = load_fp8_experts(sd, PREFIX, experts=range(2, 4))
    ref = q.slice_experts(2, 4)
    assert got.num_experts == 2
    assert torch.equal(got.w2_q.view(torch.uint8), ref.w2_q.view(torch.uint8))
    assert torch.equal(got.w13_scale, ref.w13_scale)


def test_bad_checkpoints_name_the_tensor():
    sd, _ = _checkpoint(E=2)
    with pytest.raises(KeyError, match="experts.<e>.gate_proj.weight"):
        load_fp8_experts(sd, "model.layers.4.mlp.")
    bad = dict(sd)
    bad[f"{PREFIX}experts.1.up_proj.weight"] = bad[f"{PREFIX}experts.1.up_proj.weight"].float()
    with pytest.raises(TypeError, match="experts.1.up_proj.weight"):
        load_fp8_experts(bad, PREFIX)
    bad = dict(sd)
    bad[f"{PREFIX}experts.0.down_proj.weight_scale_inv"] = torch.ones(1, 1)
    with pytest.raises(ValueError, match="down_proj.weight_scale_inv"):
        load_fp8_experts(bad, PREFIX)
    bad = dict(sd)
    del bad[f"{PREFIX}experts.1.down_proj.weight_scale_inv"]
    with pytest.raises(KeyError, match="experts.1.down_proj.weight_scale_inv"):
        load_fp8_experts(bad, PREFIX)


@pytest.mark.gpu
def test_loads_onto_the_gpu():
    sd, q = _checkpoint(E=2)
    got = load_fp8_experts(sd, PREFIX, device="cuda")
    assert got.device.type == "cuda"
    assert torch.equal(got.w13_q.cpu().view(torch.uint8), q.w13_q.view(torch.uint8))
