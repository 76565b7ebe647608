"""SPEC §6: bad input to the public entry points raises an error naming the argument."""
import pytest
import torch

import mojo_opset as mo

T, H, E, I, K = 6, 8, 4, 4, 2


def good():
    torch.manual_seed(0)
    return dict(x=torch.randn(T, H), gate_weight=torch.randn(E, H), w13=torch.randn(E, 2 * I, H),
                w2=torch.randn(E, H, I), top_k=K)


def forward(**over):
    a = {**good(), **over}
    return mo.moe_forward(a.pop("x"), a.pop("gate_weight"), a.pop("w13"), a.pop("w2"), a.pop("top_k"), **a)


def gating(**over):
    a = {**good(), **over}
    a.pop("w13"), a.pop("w2")
    return mo.moe_gating(a.pop("x"), a.pop("gate_weight"), a.pop("top_k"), **a)


META = torch.device("meta")
ROUTING_CASES = [
    # (argument override, exception, words the message must contain)
    (dict(x=[[1.0] * H]), TypeError, "x"),
    (dict(x=torch.ones(T, H, dtype=torch.int64)), TypeError, "x must have dtype"),
    (dict(x=torch.ones(T, 0)), ValueError, "x must have a non-empty last dimension H"),
    (dict(gate_weight=torch.randn(E * H)), ValueError, "gate_weight must have 2 dimensions"),
    (dict(gate_weight=torch.randn(E, H + 1)), ValueError, "gate_weight must have shape [E, H]"),
    (dict(gate_weight=torch.randn(E, H, device=META)), ValueError, "gate_weight is on meta"),
    (dict(gate_weight=torch.randn(E, H).to(torch.int32)), TypeError, "gate_weight must have dtype"),
    (dict(gate_bias=torch.randn(E + 1)), ValueError, "gate_bias must have shape [4]"),
    (dict(gate_bias=torch.randn(E, device=META)), ValueError, "gate_bias is on meta"),
    (dict(top_k=0), ValueError, "top_k must satisfy 0 < top_k <= E = 4, got 0"),
    (dict(top_k=-1), ValueError, "top_k must satisfy"),
    (dict(top_k=E + 1), ValueError, "top_k must satisfy 0 < top_k <= E = 4, got 5"),
    (dict(top_k=2.0), TypeError, "top_k must be an int"),
    (dict(score_func="relu"), ValueError, "score_func must be one of 'softmax', 'sigmoid'"),
    (dict(group_score="sum"), ValueError, "group_score must be one of"),
    (dict(route_norm=1), TypeError, "route_norm must be a bool"),
    (dict(route_scale="2"), TypeError, "route_scale must be a float"),
    (dict(expert_bias=torch.zeros(E - 1)), ValueError, "expert_bias must have shape [4]"),
    (dict(expert_bias=torch.zeros(E, device=META)), ValueError, "expert_bias is on meta"),
    (dict(num_expert_groups=3), ValueError, "num_expert_groups must divide E = 4, got 3"),
    (dict(num_expert_groups=0), ValueError, "num_expert_groups must be >= 1"),
    (dict(num_expert_groups=2, num_limited_groups=3), ValueError, "num_limited_groups must be <= 2"),
    (dict(num_expert_groups=2, num_limited_groups=0), ValueError, "num_limited_groups must be >= 1"),
    (dict(top_k=3, num_expert_groups=4, num_limited_groups=2), ValueError,
     "num_limited_groups x experts per group must be >= top_k: 2 x 1 < 3"),
    (dict(router_dtype=torch.int8), TypeError, "router_dtype"),
    # router replay
    (dict(forced_expert_ids=torch.tensor([[0, 4]] * T)), ValueError, "forced_expert_ids must lie in [0, 4)"),
    (dict(forced_expert_ids=torch.tensor([[0, -2]] * T)), ValueError, "forced_expert_ids must lie in [0, 4)"),
    (dict(forced_expert_ids=torch.tensor([[0, 1]] * 5 + [[2, 2]])), ValueError,
     "forced_expert_ids must not repeat an expert within a row; row 5 is [2, 2]"),
    (dict(forced_expert_ids=torch.zeros(T, K)), TypeError, "forced_expert_ids must have an integer dtype"),
    (dict(forced_expert_ids=torch.zeros(T, K, dtype=torch.bool)), TypeError, "forced_expert_ids must have an integer"),
    (dict(forced_expert_ids=torch.zeros(T, K + 1, dtype=torch.int64)), ValueError,
     "forced_expert_ids must have shape [T, top_k] = [6, 2], got [6, 3]"),
    (dict(forced_expert_ids=torch.zeros(T * K, dtype=torch.int64)), ValueError, "forced_expert_ids must have 2"),
    (dict(forced_expert_ids=[[0, 1]] * T), TypeError, "forced_expert_ids must be a torch.Tensor"),
]


@pytest.mark.parametrize("over,exc,words", ROUTING_CASES, ids=lambda v: None)
@pytest.mark.parametrize("entry", [gating, forward])
def test_routing_arguments(entry, over, exc, words):
    with pytest.raises(exc) as info:
        entry(**over)
    assert words in str(info.value)


FORWARD_CASES = [
    (dict(activation="gelu"), ValueError, "activation must be one of 'swiglu', got 'gelu'"),
    (dict(w13=torch.randn(E, 2 * I)), ValueError, "w13 must have 3 dimensions"),
    (dict(w13=torch.randn(E + 1, 2 * I, H)), ValueError, "w13 must have 4 experts"),
    (dict(w13=torch.randn(E, 2 * I + 1, H)), ValueError, "w13 must have shape [E, 2*I, H]"),
    (dict(w13=torch.randn(E, 2 * I, H + 1)), ValueError, "w13 must have shape [E, 2*I, H] with H = 8"),
    (dict(w13=torch.randn(E, 2 * I, H, device=META)), ValueError, "w13 is on meta"),
    (dict(w13=torch.randn(E, 2 * I, H).to(torch.int8)), TypeError, "w13 must have dtype"),
    (dict(w2=torch.randn(E, H, I + 1)), ValueError, "w2 must have shape [E, H, I] = [4, 8, 4]"),
    (dict(w2=torch.randn(E, H)), ValueError, "w2 must have 3 dimensions"),
    (dict(w2=torch.randn(E, H, I, device=META)), ValueError, "w2 is on meta"),
    (dict(shared_w13=torch.randn(2 * I, H)), ValueError, "shared_w13 and shared_w2 must be given together"),
    (dict(shared_w13=torch.randn(2 * I + 1, H), shared_w2=torch.randn(H, I)), ValueError,
     "shared_w13 must have shape [2*I_s, H]"),
    (dict(shared_w13=torch.randn(2 * I, H), shared_w2=torch.randn(H, I + 1)), ValueError,
     "shared_w2 must have shape [8, 4]"),
    (dict(shared_w13=torch.randn(2 * I, H), shared_w2=torch.randn(H, I), shared_gate=torch.randn(H)), ValueError,
     "shared_gate must have shape [1, 8]"),
    (dict(shared_gate=torch.randn(1, H)), ValueError, "shared_gate needs shared_w13 and shared_w2"),
    (dict(shared_w13=torch.randn(2 * I, H, device=META), shared_w2=torch.randn(H, I)), ValueError,
     "shared_w13 is on meta"),
    (dict(ep_mode="broadcast"), ValueError, "ep_mode must be one of 'allgather', 'alltoall'"),
    (dict(x=torch.tensor(1.0)), ValueError, "x must have shape [..., H]"),
]


@pytest.mark.parametrize("over,exc,words", FORWARD_CASES, ids=lambda v: None)
def test_forward_arguments(over, exc, words):
    with pytest.raises(exc) as info:
        forward(**over)
    assert words in str(info.value)


def test_x_on_another_device_than_weights():
    x = torch.randn(T, H, device=META)
    with pytest.raises(ValueError, match="gate_weight is on cpu but x is on meta"):
        forward(x=x)


def test_empty_tokens_return_empty_outputs():
    ids, w = gating(x=torch.zeros(0, H))
    assert ids.shape == (0, K) and w.shape == (0, K)
    y = forward(x=torch.zeros(0, H), forced_expert_ids=torch.zeros(0, K, dtype=torch.int64))
    assert y.shape == (0, H)


def test_nan_inf_x_never_crash_or_leave_range():
    x = good()["x"]
    x[0] = float("nan")
    x[1] = float("inf")
    x[2] = -float("inf")
    for kw in ({}, dict(score_func="sigmoid", num_expert_groups=2, num_limited_groups=1, route_norm=True)):
        ids, w = gating(x=x, **kw)
        assert ids.min() >= 0 and ids.max() < E
        s = ids.sort(dim=1).values
        assert (s[:, 1:] != s[:, :-1]).all()  # ids within a row stay distinct
        y = forward(x=x, **kw)
        assert torch.isnan(y[0]).all()
        assert not torch.isfinite(y[1]).all() and not torch.isfinite(y[2]).all()
        assert torch.isfinite(y[3:]).all()
