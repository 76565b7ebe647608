"""The npu backend on a real Ascend NPU (skipped elsewhere): every served op against the reference."""
import pytest
import torch

import mojo_opset as mo

pytestmark = pytest.mark.npu


def _layer(T, H=256, E=16, I=128, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(T)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype).to("npu")  # noqa: E731
    return mk(T, H), mk(E, H), mk(E, 2 * I, H, sc=H ** -0.5), mk(E, H, I, sc=I ** -0.5)


@pytest.mark.parametrize("T", [1, 64, 1024])
@pytest.mark.parametrize("routing", [dict(), dict(score_func="sigmoid", route_norm=True, route_scale=2.5,
                                                  num_expert_groups=4, num_limited_groups=2)])
def test_moe_forward_on_npu(T, routing):
    x, gw, w13, w2 = _layer(T)
    assert mo.available_backends()["npu"]["available"]
    with mo.strict():
        y, info = mo.moe_forward(x, gw, w13, w2, 4, backend="npu", return_router_info=True, **routing)
    ref, rinfo = mo.moe_forward(x, gw, w13, w2, 4, backend="torch", return_router_info=True, **routing)
    assert torch.equal(info["topk_ids"], rinfo["topk_ids"])
    torch.testing.assert_close(y, ref, rtol=1.6e-2, atol=2e-2)


@pytest.mark.parametrize("scheme", ["w8a8_int8", "w8a16_int8"])
def test_quant_moe_forward_on_npu(scheme):
    x, gw, w13, w2 = _layer(128)
    q = mo.quantize_experts(w13, w2, scheme)
    with mo.strict():
        y = mo.quant_moe_forward(x, gw, q, 4, backend="npu")
    ref = mo.quant_moe_forward(x, gw, q, 4, backend="torch")
    torch.testing.assert_close(y, ref, rtol=0, atol=float(ref.abs().max()) * 3 / 127)
