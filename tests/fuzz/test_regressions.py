"""Failures the fuzzer found, kept as named tests with their minimal examples."""
import pytest
import torch

import mojo_opset as mo

from .cases import Case, build
from .test_fuzz_backends import KERNEL_BACKENDS


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forced_natural_ids_bit_identical_with_group_limited_routing(backend):
    """The triton routing kernel laid a forced call's row out as one group but a group-limited natural
    call as [groups, experts per group]; the softmax's reduction order differed, so replaying the natural
    routing changed the weights in the last bit (found by test_forward_matches_reference)."""
    case = Case(T=2, H=64, E=16, K=5, I=32, dtype=torch.float32, seed=0,
                routing=dict(score_func="softmax", route_norm=False, route_scale=1.0, num_expert_groups=8,
                             num_limited_groups=7, group_score="top2_sum", router_dtype=torch.float32,
                             gate_bias=True, expert_bias=True), shared=True)
    x, gw, w13, w2, kw = build(case)
    y, info = mo.moe_forward(x, gw, w13, w2, case.K, return_router_info=True, backend=backend, **kw)
    natural = mo.last_served("moe_gating")["served_by"]
    y2, info2 = mo.moe_forward(x, gw, w13, w2, case.K, return_router_info=True, backend=backend,
                               forced_expert_ids=info["topk_ids"], **kw)
    if natural == "kernel" and mo.last_served("moe_gating")["served_by"] == "kernel":
        assert torch.equal(info2["topk_weights"], info["topk_weights"])
        assert torch.equal(y2, y)
    else:  # across a fallback: within tolerance
        torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
