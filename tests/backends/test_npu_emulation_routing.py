"""The npu backend's gating, permute and combine against the reference, on the torch_npu EMULATION.

A pure-PyTorch stand-in for torch_npu (tests/npu_emulation) is installed per test, so this checks the
mapping of our op contract onto the operators' documented semantics -- not the NPU itself."""
import itertools

import pytest
import torch

import mojo_opset as mo
from mojo_opset.contract import CombineCall, PermuteCall
from mojo_opset.dispatch import decide, dispatch
from mojo_opset.functional.combine import combine_reference_call
from mojo_opset.functional.permute import permute_reference_call
from mojo_opset.reference.combine import combine_reference
from mojo_opset.reference.permute import permute_reference
from npu_emulation.fixtures import npu_emulation, npu_emulation_factory  # noqa: F401


def _route(backend, x, gw, K, **kw):
    return mo.moe_gating(x, gw, K, backend=backend, return_scores=True, **kw)


def _served(op):
    rec = mo.last_served(op)
    return rec["backend"], rec["served_by"], rec["reasons"]


def _assert_routing_equal(got, ref):
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-6, atol=1e-7)


OPTIONS = list(itertools.product(["softmax", "sigmoid"], [False, True], [1.0, 2.5], [False, True],
                                 [(1, None, "top2_sum"), (4, 2, "top2_sum"), (4, 1, "max"), (8, 8, "max")]))


@pytest.mark.parametrize("score_func,norm,scale,bias,groups", OPTIONS)
def test_gating_emulation_matches_reference(npu_emulation, score_func, norm, scale, bias, groups):
    g = torch.Generator().manual_seed(hash((score_func, norm, scale, bias, groups)) % 2**31)
    T, E, K, H = 9, 32, 4, 16
    x, gw = torch.randn(T, H, generator=g), torch.randn(E, H, generator=g)
    G, L, gs = groups
    kw = dict(score_func=score_func, route_norm=norm, route_scale=scale, num_expert_groups=G,
              num_limited_groups=L, group_score=gs,
              expert_bias=torch.randn(E, generator=g) * 0.05 if bias else None)
    with mo.strict():
        got = _route("npu", x, gw, K, **kw)
    assert _served("moe_gating") == ("npu", "kernel", [])
    _assert_routing_equal(got, _route("torch", x, gw, K, **kw))


@pytest.mark.parametrize("router_dtype", [torch.float32, None])
def test_gating_emulation_keeps_fp32_expert_bias_with_bf16_logits(npu_emulation, router_dtype):
    # uniform scores; biases 1 + i/10000 all round to 1.0 in bf16, which would turn the choice into ties
    T, E, K = 4, 16, 3
    x = torch.zeros(T, 8, dtype=torch.bfloat16)
    gw = torch.randn(E, 8, dtype=torch.bfloat16)
    eb = 1.0 + torch.arange(E, dtype=torch.float32) / 10000
    assert torch.unique(eb.to(torch.bfloat16)).numel() == 1
    kw = dict(expert_bias=eb, router_dtype=router_dtype, score_func="sigmoid", route_norm=True)
    with mo.strict():
        got = _route("npu", x, gw, K, **kw)
    ref = _route("torch", x, gw, K, **kw)
    assert ref[0][0].tolist() == [15, 14, 13]
    _assert_routing_equal(got, ref)


def test_gating_emulation_ties_go_to_lower_expert_id(npu_emulation):
    x, gw = torch.zeros(5, 8), torch.randn(12, 8)      # every logit 0: a 12-way tie in every row
    with mo.strict():
        got = _route("npu", x, gw, 4, num_expert_groups=4, num_limited_groups=2)
    ref = _route("torch", x, gw, 4, num_expert_groups=4, num_limited_groups=2)
    assert ref[0].tolist() == [[0, 1, 2, 3]] * 5
    _assert_routing_equal(got, ref)


def _fallback(op, reason_part):
    backend, served_by, reasons = _served(op)
    assert (backend, served_by) == ("npu", "fallback")
    assert any(reason_part in r for r in reasons), reasons


@pytest.mark.parametrize("case,E,kw,reason", [
    ("replay", 8, dict(forced_expert_ids=torch.tensor([[3, 1], [0, 7], [5, 6]])), "forced_expert_ids"),
    ("two experts", 2, {}, "more than 2 per group"),
    ("groups of two", 8, dict(num_expert_groups=4, num_limited_groups=2), "more than 2 per group"),
    ("too many experts", 2049, {}, "limit of 2048"),
])
def test_gating_emulation_declines_with_reason(npu_emulation, case, E, kw, reason):
    g = torch.Generator().manual_seed(1)
    x, gw = torch.randn(3, 8, generator=g), torch.randn(E, 8, generator=g)
    with mo.strict(), pytest.raises(mo.StrictFallbackError, match=reason):
        _route("npu", x, gw, 2, **kw)
    got = _route("npu", x, gw, 2, **kw)
    _fallback("moe_gating", reason)
    _assert_routing_equal(got, _route("torch", x, gw, 2, **kw))


def test_undeclared_options_are_declined_never_ignored(npu_emulation):
    """An option the contract gains later reaches every npu op as a reason, never a silent default."""
    from test_contract import sample_calls, with_new_option
    impls = mo.registry.get_entry("npu").impls()
    for op, call in sample_calls().items():
        if op not in impls:
            continue
        _, _, served_by, reasons = decide(with_new_option(call), "npu")
        assert served_by == "fallback" and "option new_feature=1 is not implemented" in reasons, (op, reasons)
        assert decide(with_new_option(call, 0), "npu")[2] == decide(call, "npu")[2]


def test_gating_emulation_empty_input_falls_back(npu_emulation):
    ids, w = mo.moe_gating(torch.zeros(0, 8), torch.randn(6, 8), 2, backend="npu")
    assert ids.shape == (0, 2) and w.shape == (0, 2)
    _fallback("moe_gating", "T = 0")


def test_gating_emulation_older_release_serves_only_deepseek_v3(npu_emulation_factory):
    npu_emulation_factory(version="2.6.0")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, generator=g)
    ds = dict(score_func="sigmoid", route_norm=True, route_scale=2.5, num_expert_groups=8, num_limited_groups=4,
              expert_bias=torch.randn(256, generator=g) * 0.01)
    gw = torch.randn(256, 16, generator=g)
    with mo.strict():
        got = _route("npu", x, gw, 8, **ds)
    _assert_routing_equal(got, _route("torch", x, gw, 8, **ds))
    _route("npu", x, gw[:64], 8)
    _fallback("moe_gating", "torch_npu >= 2.7.1")


def test_gating_emulation_missing_operator_falls_back(npu_emulation_factory):
    npu_emulation_factory(version="2.4.0", without=("npu_moe_gating_top_k",))
    x, gw = torch.randn(3, 8), torch.randn(8, 8)
    got = _route("npu", x, gw, 2)
    _fallback("moe_gating", "has no npu_moe_gating_top_k")
    _assert_routing_equal(got, _route("torch", x, gw, 2))


# --------------------------------------------------------------------------- permute and combine

def _ids(T, K, E, g):
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)


@pytest.mark.parametrize("align", [1, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_emulation_matches_reference(npu_emulation, align, dtype):
    g = torch.Generator().manual_seed(align)
    T, K, E, H = 11, 3, 6, 8
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = _ids(T, K, E, g)
    ids[:, 0] = 2                      # a crowded expert, so stable order matters; expert 5 may be empty
    call = dict(x=x, topk_ids=ids, num_experts=E, align=align)
    with mo.strict():
        got, served = dispatch(PermuteCall(**call), permute_reference_call, backend="npu")
    assert served == "kernel"
    ref = permute_reference(**call)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_permute_emulation_declines_int64_ids(npu_emulation):
    x, ids = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int64)
    ids[:, 1] = 1
    with mo.strict(), pytest.raises(mo.StrictFallbackError, match="int32 expert ids"):
        dispatch(PermuteCall(x=x, topk_ids=ids, num_experts=4, align=1), permute_reference_call, backend="npu")


@pytest.mark.parametrize("without", [(), ("npu_moe_token_unpermute",)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_emulation_matches_reference(npu_emulation_factory, without, dtype):
    npu_emulation_factory(without=without)
    g = torch.Generator().manual_seed(3)
    T, K, E, H = 10, 2, 5, 16
    ids = _ids(T, K, E, g)
    _, _, _, _, pair_row = permute_reference(torch.zeros(T, 1), ids, E)
    y = torch.randn(T * K, H, generator=g).to(dtype)
    w = torch.rand(T, K, generator=g)
    call = dict(expert_out=y, pair_row=pair_row, topk_weights=w, num_tokens=T)
    with mo.strict():
        got, served = dispatch(CombineCall(**call), combine_reference_call, backend="npu")
    assert served == "kernel" and got.dtype == dtype
    # bf16: the operators take the weights in the rows' dtype (2**-9 relative rounding)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(got, combine_reference(**call), **tol)


def test_combine_emulation_declines_padded_rows_and_old_finalize(npu_emulation_factory):
    g = torch.Generator().manual_seed(4)
    T, K, E, H = 6, 2, 4, 8
    ids = _ids(T, K, E, g)
    px, _, ends, _, pair_row = permute_reference(torch.randn(T, H, generator=g), ids, E, align=8)
    call = dict(expert_out=px, pair_row=pair_row, topk_weights=torch.rand(T, K, generator=g), num_tokens=T)
    npu_emulation_factory()
    got, served = dispatch(CombineCall(**call), combine_reference_call, backend="npu")
    assert served == "fallback"
    _fallback("moe_combine", "exactly T*K rows")
    torch.testing.assert_close(got, combine_reference(**call))
    npu_emulation_factory(version="2.3.1", without=("npu_moe_token_unpermute",))
    _, _, _, _, pair_row = permute_reference(torch.zeros(T, 1), ids, E)
    call.update(expert_out=torch.randn(T * K, H, generator=g), pair_row=pair_row)
    dispatch(CombineCall(**call), combine_reference_call, backend="npu")
    _fallback("moe_combine", "has neither npu_moe_token_unpermute")
