"""Failures the fuzzer found, kept as named tests with their minimal examples."""
import pytest
import torch

import mojo_opset as mo

from .cases import Case, build
from .checks import assert_close_rows
from .test_fuzz_backends import KERNEL_BACKENDS


FORCED_NATURAL_CASES = {
    # the triton routing kernel laid a forced call's row out as one group but a group-limited natural
    # call as [groups, experts per group]: the softmax's reduction order differed (CPU interpreter)
    "tile-layout": Case(T=2, H=64, E=16, K=5, I=32, dtype=torch.float32, seed=0,
                        routing=dict(score_func="softmax", route_norm=False, route_scale=1.0,
                                     num_expert_groups=8, num_limited_groups=7, group_score="top2_sum",
                                     router_dtype=torch.float32, gate_bias=True, expert_bias=True),
                        shared=True),
    # forced and natural routing were two compiled variants of the kernel, which evaluated the softmax
    # with different instructions on the GPU (long profile on the H100)
    "kernel-variant": Case(T=299, H=192, E=197, K=4, I=16, dtype=torch.bfloat16, seed=256,
                           routing=dict(score_func="softmax", route_norm=True, route_scale=2.5,
                                        num_expert_groups=197, num_limited_groups=130, group_score="top2_sum",
                                        router_dtype=None, gate_bias=True, expert_bias=True)),
}


@pytest.mark.parametrize("name", sorted(FORCED_NATURAL_CASES))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forced_natural_ids_bit_identical(backend, name):
    """Replaying a backend's own routing as forced_expert_ids must reproduce its output bit for bit."""
    case = FORCED_NATURAL_CASES[name]
    if not torch.cuda.is_available():  # interpreter: its bf16 dot is wrong, and it is slow
        case = Case(**{**case.__dict__, "dtype": torch.float16 if case.dtype == torch.bfloat16 else case.dtype,
                       "T": min(case.T, 24)})
    x, gw, w13, w2, kw = build(case)
    y, info = mo.moe_forward(x, gw, w13, w2, case.K, return_router_info=True, backend=backend, **kw)
    natural = mo.last_served("moe_gating")["served_by"]
    y2, info2 = mo.moe_forward(x, gw, w13, w2, case.K, return_router_info=True, backend=backend,
                               forced_expert_ids=info["topk_ids"], **kw)
    if natural == "kernel" and mo.last_served("moe_gating")["served_by"] == "kernel":
        assert torch.equal(info2["topk_weights"], info["topk_weights"])
        assert torch.equal(y2, y)
    else:  # across a fallback: within the dtype's tolerance
        assert_close_rows(y2, y, torch.ones(case.T, dtype=torch.bool, device=y.device), case.dtype,
                          f"{backend} forced vs natural")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sigmoid_weights_with_unaligned_group_size(backend):
    """E=100 in 5 groups pads each group of 20 experts to 32 lanes; the triton routing kernel gathered
    a chosen expert's score over all lanes with that id, and a padding lane of the previous group
    (sigmoid(0) = 0.5) aliased it, adding 0.5 to the weight (found by the long profile on the GPU)."""
    case = Case(T=100, H=128, E=100, K=6, I=128, dtype=torch.float16, seed=237,
                routing=dict(score_func="sigmoid", route_norm=False, route_scale=1.0, num_expert_groups=5,
                             num_limited_groups=1, group_score="top2_sum", router_dtype=torch.float32,
                             gate_bias=False, expert_bias=True))
    x, gw, _, _, kw = build(case)
    kw = {k: v for k, v in kw.items() if not k.startswith("shared")}
    ids, w, scores = mo.moe_gating(x, gw, case.K, backend=backend, return_scores=True, **kw)
    ids_r, w_r, scores_r = mo.moe_gating(x, gw, case.K, backend="torch", return_scores=True, **kw)
    assert torch.equal(ids, ids_r)
    torch.testing.assert_close(w, w_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores, scores_r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_misaligned_views_match_contiguous(backend):
    """Weights and x that are contiguous views starting 3 elements into their storage (a slice of a
    flat parameter buffer): the reference's torch._grouped_mm path on the GPU (bf16) raised "expected
    data_ptr to be aligned to 16 bytes" (found by the long profile on the H100).  Every backend must
    give the result of the same values laid out from offset 0."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float16
    base = Case(T=40, H=64, E=6, K=2, I=32, dtype=dtype, seed=7,
                routing=dict(score_func="softmax", route_norm=True, route_scale=1.0, num_expert_groups=1,
                             num_limited_groups=None, group_score="top2_sum", router_dtype=torch.float32,
                             gate_bias=False, expert_bias=False), shared=True)
    shifted = Case(**{**base.__dict__, "x_layout": "offset", "w_layout": "offset"})
    x, gw, w13, w2, kw = build(shifted)
    assert w13.data_ptr() % 16 and x.data_ptr() % 16 and w13.is_contiguous()
    y = mo.moe_forward(x, gw, w13, w2, base.K, backend=backend, **kw)
    x0, gw0, w130, w20, kw0 = build(base)
    y0 = mo.moe_forward(x0, gw0, w130, w20, base.K, backend=backend, **kw0)
    assert_close_rows(y, y0, torch.ones(base.T, dtype=torch.bool, device=y.device), dtype,
                      f"{backend} misaligned vs aligned")
    if backend == "torch":
        assert torch.equal(y, y0)
