"""The ttx kernels compiled for a CUDA GPU: bf16 and model-sized shapes (run with ``pytest -m gpu``)."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset.contract import CombineCall, ExpertsCall, PermuteCall
from mojo_opset.functional.gating import gating_reference_call
from mojo_opset.reference.combine import combine_reference
from mojo_opset.reference.experts import experts_loop
from mojo_opset.reference.permute import permute_reference
from ttx_helpers import (TOL, assert_same_routing, expert_weights, gating_call, grid_randn, interpreted, random_ids,
                         run_op, ttx_available)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or not ttx_available() or interpreted(),
                                 reason="needs the ttx backend compiled for a CUDA GPU")]
DEV = "cuda"


@pytest.mark.parametrize("T", [1, 333, 4096])
@pytest.mark.parametrize("case", [
    dict(E=256, K=8, score_func="sigmoid", num_expert_groups=8, num_limited_groups=4, route_norm=True,
         route_scale=2.5, bias=True),                                   # DeepSeek-V3
    dict(E=128, K=8, route_norm=True),                                  # Qwen3-30B-A3B
    dict(E=8, K=2),                                                     # Mixtral
    dict(E=160, K=6, num_expert_groups=8, num_limited_groups=3, group_score="max")])  # DeepSeek-V2
def test_gating(T, case):
    case = dict(case)
    g = torch.Generator().manual_seed(T)
    E, K, bias = case.pop("E"), case.pop("K"), case.pop("bias", False)
    if bias:
        case["expert_bias"] = grid_randn(E, step=1 / 256, generator=g, device=DEV) * 0.01
    logits = grid_randn(T, E, generator=g, device=DEV)
    logits[T // 2] = float("nan")
    call = gating_call(logits, K, **case)
    with mo.strict():
        (ids, w, scores), rec = run_op(call)
    assert rec["served_by"] == "kernel"
    ref = gating_reference_call(call)
    bias = call.routing.expert_bias
    choice = ref[2] if bias is None else ref[2] + bias
    assert_same_routing(ids, ref[0], choice)
    torch.testing.assert_close(w, ref[1], rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(scores, ref[2], rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("align", [1, 16, 128])
@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (2048, 128, 8), (8192, 256, 8)])
def test_permute_combine_bf16(align, T, E, K):
    g = torch.Generator().manual_seed(align + T)
    x = torch.randn(T, 512, generator=g).to(DEV, torch.bfloat16)
    ids = random_ids(T, E, K, generator=g, device=DEV)
    with mo.strict():
        out, rec = run_op(PermuteCall(x=x, topk_ids=ids, num_experts=E, align=align))
    assert rec["served_by"] == "kernel"
    for a, b in zip(out, permute_reference(x, ids, E, align)):
        assert torch.equal(a, b)
    y = torch.randn(out[0].shape, generator=g).to(DEV, torch.bfloat16)
    w = torch.rand(T, K, generator=g).to(DEV)
    with mo.strict():
        c, rec = run_op(CombineCall(expert_out=y, pair_row=out[4], topk_weights=w, num_tokens=T))
    assert rec["served_by"] == "kernel"
    torch.testing.assert_close(c, combine_reference(y, out[4], w, T), **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,E,K,H,I", [(1, 8, 2, 1024, 512), (300, 16, 4, 1024, 384), (2048, 64, 8, 512, 256)])
def test_experts(dtype, T, E, K, H, I):
    g = torch.Generator().manual_seed(T + E)
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    px, _, ends, _, _ = permute_reference(x, random_ids(T, E, K, generator=g, device=DEV), E, 1)
    w13, w2 = expert_weights(E, H, I, dtype, generator=g, device=DEV)
    with mo.strict():
        y, rec = run_op(ExpertsCall(permuted_x=px, group_ends=ends, w13=w13, w2=w2, activation="swiglu"))
    assert rec["served_by"] == "kernel"
    torch.testing.assert_close(y, experts_loop(px, ends, w13, w2), **TOL[dtype])


@pytest.mark.parametrize("T", [1, 64, 1000])
def test_moe_forward_bf16(T):
    g = torch.Generator().manual_seed(T)
    E, K, H, I = 32, 4, 1024, 512
    x = torch.randn(T, H, generator=g).to(DEV, torch.bfloat16)
    gate = torch.randn(E, H, generator=g).to(DEV, torch.bfloat16)
    w13, w2 = expert_weights(E, H, I, torch.bfloat16, generator=g, device=DEV)
    with mo.strict():
        y, info = mo.moe_forward(x, gate, w13, w2, K, backend="ttx", return_router_info=True)
    for op in ("moe_gating", "moe_permute", "moe_experts", "moe_combine"):
        assert mo.last_served(op)["served_by"] == "kernel", op
    ref, ref_info = mo.moe_forward(x, gate, w13, w2, K, backend="torch", return_router_info=True)
    same = (info["topk_ids"] == ref_info["topk_ids"]).all(dim=1)
    assert same.float().mean() > 0.99  # fp32 router logits: differences only at last-place near-ties
    torch.testing.assert_close(y[same], ref[same], **TOL[torch.bfloat16])
