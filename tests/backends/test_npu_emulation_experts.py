"""The npu backend's experts, MoE forward and quantized MoE forward against the reference, on the
torch_npu EMULATION (a pure-PyTorch stand-in written from the operators' documentation; not an NPU)."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset.contract import ExpertsCall
from mojo_opset.dispatch import dispatch
from mojo_opset.functional.experts import experts_reference_call
from mojo_opset.reference.experts import experts_reference
from mojo_opset.reference.permute import permute_reference
from npu_emulation.fixtures import npu_emulation, npu_emulation_factory  # noqa: F401

TOL = {torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2), torch.float16: dict(rtol=1e-3, atol=2e-3)}


def _layer(T=13, H=32, E=6, I=16, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    gw = torch.randn(E, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    return x, gw, w13, w2


def _served(op):
    rec = mo.last_served(op)
    return rec["backend"], rec["served_by"], rec["reasons"]


@pytest.mark.parametrize("align", [1, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_emulation_matches_reference(npu_emulation, dtype, align):
    x, gw, w13, w2 = _layer(dtype=dtype)
    ids, _ = mo.moe_gating(x, gw, 2, backend="torch")
    ids[:, 0] = 1                                               # a crowded expert; others may be empty
    ids[:, 1] = torch.where(ids[:, 1] == 1, 0, ids[:, 1])
    px, _, ends, _, _ = permute_reference(x, ids, w13.shape[0], align=align)
    call = dict(permuted_x=px, group_ends=ends, w13=w13, w2=w2, activation="swiglu")
    with mo.strict():
        y, served = dispatch(ExpertsCall(**call), experts_reference_call, backend="npu")
    assert served == "kernel" and y.dtype == dtype
    ref = experts_reference(**call)
    torch.testing.assert_close(y, ref, **TOL[dtype])
    assert torch.equal(y[int(ends[-1]):], torch.zeros_like(y[int(ends[-1]):]))   # rows past the groups


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 13])
def test_moe_forward_emulation_matches_reference(npu_emulation, dtype, T):
    x, gw, w13, w2 = _layer(T=T, dtype=dtype, seed=T)
    kw = dict(score_func="sigmoid", route_norm=True, route_scale=1.5)
    with mo.strict():
        y = mo.moe_forward(x, gw, w13, w2, 3, backend="npu", **kw)
    assert _served("moe_forward") == ("npu", "kernel", [])
    assert _served("moe_gating") == ("npu", "kernel", [])
    torch.testing.assert_close(y, mo.moe_forward(x, gw, w13, w2, 3, backend="torch", **kw), **TOL[dtype])


def test_moe_forward_emulation_sub_ops_compose(npu_emulation):
    # moe_forward on the reference composition, its permute / experts / combine on the npu backend
    x, gw, w13, w2 = _layer()
    with mo.strict(), mo.use_backend("npu", ops=["moe_permute", "moe_experts", "moe_combine"]):
        y = mo.moe_forward(x, gw, w13, w2, 2)
    for op in ("moe_permute", "moe_experts", "moe_combine"):
        assert _served(op) == ("npu", "kernel", []), op
    torch.testing.assert_close(y, mo.moe_forward(x, gw, w13, w2, 2, backend="torch"), **TOL[torch.bfloat16])


@pytest.mark.parametrize("case,make,reason", [
    ("fp32", lambda x, w13, w2: (x.float(), w13.float(), w2.float()), "serves float16, bfloat16"),
    ("mixed weights", lambda x, w13, w2: (x, w13.half(), w2.half()), "does not cast weights"),
    ("strided weights", lambda x, w13, w2: (x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2),
     "not contiguous"),
])
def test_moe_forward_emulation_declines_with_reason(npu_emulation, case, make, reason):
    x, gw, w13, w2 = _layer()
    x, w13, w2 = make(x, w13, w2)
    gw = gw.to(x.dtype)
    y = mo.moe_forward(x, gw, w13, w2, 2, backend="npu")
    backend, served_by, reasons = _served("moe_forward")
    assert (backend, served_by) == ("npu", "fallback") and any(reason in r for r in reasons), reasons
    # the sub-ops the fallback composes may still run on the backend (combine rounds weights to bf16)
    torch.testing.assert_close(y, mo.moe_forward(x, gw, w13, w2, 2, backend="torch"), **TOL.get(x.dtype, {}))


def test_moe_forward_emulation_without_grouped_matmul_falls_back(npu_emulation_factory):
    npu_emulation_factory(version="2.4.0", without=("npu_grouped_matmul", "npu_moe_gating_top_k",
                                                    "npu_moe_init_routing_v2", "npu_dequant_swiglu_quant"))
    x, gw, w13, w2 = _layer()
    mo.moe_forward(x, gw, w13, w2, 2, backend="npu")
    reasons = _served("moe_forward")[2]
    assert any("has no npu_grouped_matmul" in r for r in reasons), reasons
    assert any("has no npu_moe_init_routing_v2" in r for r in reasons), reasons


def test_experts_emulation_declines_host_group_list_releases(npu_emulation_factory):
    npu_emulation_factory(version="2.4.0.post2")   # npu_grouped_matmul exists, with a host group_list
    x, gw, w13, w2 = _layer()
    px, _, ends, _, _ = permute_reference(x, mo.moe_gating(x, gw, 2, backend="torch")[0], w13.shape[0])
    call = dict(permuted_x=px, group_ends=ends, w13=w13, w2=w2, activation="swiglu")
    with mo.strict(), pytest.raises(mo.StrictFallbackError, match="group_list"):
        dispatch(ExpertsCall(**call), experts_reference_call, backend="npu")
    q = mo.quantize_experts(w13, w2, "w8a8_int8")
    with mo.strict(), mo.use_backend("npu", ops="quant_moe_forward"), \
            pytest.raises(mo.StrictFallbackError, match="group_list"):
        mo.quant_moe_forward(x, gw, q, 2)


def test_moe_forward_emulation_training_uses_reference(npu_emulation):
    x, gw, w13, w2 = _layer()
    w13.requires_grad_(True)
    y = mo.moe_forward(x, gw, w13, w2, 2, backend="npu")
    assert _served("moe_forward")[:2] == ("npu", "fallback")
    y.float().sum().backward()
    assert w13.grad is not None


# --------------------------------------------------------------------------- quantized

@pytest.mark.parametrize("scheme", ["w8a8_int8", "w8a16_int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quant_moe_forward_emulation_matches_reference(npu_emulation, scheme, dtype):
    x, gw, w13, w2 = _layer(T=17, dtype=dtype, seed=5)
    x[3] = 0                                          # a zero token: zero activation scale
    q = mo.quantize_experts(w13, w2, scheme)
    with mo.strict():
        y = mo.quant_moe_forward(x, gw, q, 2, backend="npu")
    assert _served("quant_moe_forward") == ("npu", "kernel", [])
    ref = mo.quant_moe_forward(x, gw, q, 2, backend="torch")
    assert y.dtype == dtype and torch.isfinite(y).all()
    if scheme == "w8a16_int8":
        torch.testing.assert_close(y, ref, **TOL[dtype])
    else:
        # the chain re-quantizes the SwiGLU output without first rounding it to x's dtype, so a code may
        # differ by 1 (SPEC 3.6): allow a few quantization steps of the output's range
        torch.testing.assert_close(y, ref, rtol=0, atol=float(ref.abs().max()) * 3 / 127)
        assert (y.float() - ref.float()).abs().mean() < float(ref.abs().mean()) * 0.02


@pytest.mark.parametrize("scheme,reason", [("w4a8_int4", "packed"), ("w4a16_int4", "packed"),
                                           ("w8a8_fp8_block", "fp8")])
def test_quant_moe_forward_emulation_declines_other_schemes(npu_emulation, scheme, reason):
    x, gw, w13, w2 = _layer(H=128, I=128, T=3, E=4)
    q = mo.quantize_experts(w13, w2, scheme)
    with mo.strict(), pytest.raises(mo.StrictFallbackError, match=reason):
        mo.quant_moe_forward(x, gw, q, 2, backend="npu")
    y = mo.quant_moe_forward(x, gw, q, 2, backend="npu")
    assert _served("quant_moe_forward")[:2] == ("npu", "fallback")
    # the sub-ops the fallback composes may still run on the backend (combine rounds weights to bf16)
    torch.testing.assert_close(y, mo.quant_moe_forward(x, gw, q, 2, backend="torch"), **TOL[x.dtype])


def test_quant_moe_forward_emulation_declines_fp32_activations(npu_emulation):
    x, gw, w13, w2 = _layer(dtype=torch.float32)
    q = mo.quantize_experts(w13, w2, "w8a8_int8")
    mo.quant_moe_forward(x, gw, q, 2, backend="npu")
    assert any("serves float16, bfloat16" in r for r in _served("quant_moe_forward")[2])


def test_npu_layer_compiles_fullgraph_on_the_custom_ops(npu_emulation):
    x, gw, w13, w2 = _layer(T=5)
    q = mo.quantize_experts(w13, w2, "w8a8_int8")
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def layer(x):
        y = mo.moe_forward(x, gw, w13, w2, 2, backend="npu", score_func="sigmoid", route_norm=True)
        return y + mo.quant_moe_forward(x, gw, q, 2, backend="npu")

    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(layer, fullgraph=True, backend=record)(x)
        torch.testing.assert_close(y, layer(x))
    for op in ("mojo_npu.gating", "mojo_npu.moe_forward", "mojo_npu.w8a8_int8_moe_forward"):
        assert any(op in t for t in targets), (op, targets)
