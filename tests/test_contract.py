"""The typed op contract (mojo_opset.contract) and declared capabilities (mojo_opset.backend.OpImpl):
an option a backend did not declare is declined with a reason, never ignored; decisions are cached
by the call's signature; the plugin API version is checked."""
import dataclasses

import pytest
import torch

import mojo_opset as mo
from mojo_opset import dispatch, registry
from mojo_opset.contract import (CALL_TYPES, CombineCall, ExpertsCall, ForwardCall, GatingCall, PermuteCall,
                                 QuantExpertsCall, QuantForwardCall, RoutingOptions, option)
from mojo_opset.reference.permute import permute_reference


def sample_calls():
    """One small, valid call object per op, on CPU tensors."""
    g = torch.Generator().manual_seed(0)
    T, H, E, I, K = 6, 32, 4, 16, 2
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, K, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.1
    w2 = torch.randn(E, H, I, generator=g) * 0.1
    px, _, ends, _, pair_row = permute_reference(x, ids, E, 1)
    q = mo.quantize_experts(w13, w2, "w8a16_int8")
    return {
        "moe_gating": GatingCall(logits=torch.randn(T, E, generator=g), routing=RoutingOptions(top_k=K)),
        "moe_permute": PermuteCall(x=x, topk_ids=ids, num_experts=E),
        "moe_experts": ExpertsCall(permuted_x=px, group_ends=ends, w13=w13, w2=w2),
        "moe_quant_experts": QuantExpertsCall(permuted_x=px, group_ends=ends, qexperts=q),
        "moe_combine": CombineCall(expert_out=px, pair_row=pair_row, topk_weights=w, num_tokens=T),
        "moe_forward": ForwardCall(x=x, topk_ids=ids, topk_weights=w, w13=w13, w2=w2),
        "quant_moe_forward": QuantForwardCall(x=x, topk_ids=ids, topk_weights=w, qexperts=q),
    }


def with_new_option(call, value=1):
    """The same call, of a test-only subclass that adds an option field (what a new core feature is)."""
    cls = type(call)
    new_cls = dataclasses.make_dataclass(cls.__name__ + "WithNewFeature", [("new_feature", int, option(0))],
                                         bases=(cls,), frozen=True, eq=False)
    fields = {f.name: getattr(call, f.name) for f in dataclasses.fields(call)}
    return new_cls(**fields, new_feature=value)


def in_tree_backends():
    out = []
    for name in ("triton", "ttx", "npu"):
        entry = registry.get_entry(name)
        if entry is not None and entry.availability()[0]:
            out.append(name)
    return out


def test_every_op_has_a_call_type():
    assert set(CALL_TYPES) == set(mo.OPS)
    for op, call in sample_calls().items():
        assert call.op == op


def test_active_options_name_non_defaults_only():
    r = RoutingOptions(top_k=2)
    assert r.active_options() == {}
    r = RoutingOptions(top_k=2, score_func="sigmoid", num_expert_groups=1, group_score="max")
    assert r.active_options() == {"score_func": "sigmoid"}          # group_score means nothing without groups
    r = RoutingOptions(top_k=2, num_expert_groups=4, num_limited_groups=2, group_score="max")
    assert r.active_options() == {"num_expert_groups": 4, "group_score": "max"}
    call = GatingCall(logits=torch.zeros(2, 8), routing=RoutingOptions(top_k=2, expert_bias=torch.zeros(8)))
    assert set(call.active_options()) == {"expert_bias"}


@pytest.mark.parametrize("backend", in_tree_backends())
def test_a_new_option_is_declined_by_every_in_tree_backend(backend):
    impls = registry.get_entry(backend).impls()
    assert impls, backend
    for op, call in sample_calls().items():
        if op not in impls:
            continue
        plain = dispatch.decide(call, backend)
        assert not any("new_feature" in r for r in plain[3])
        name, impl, served_by, reasons = dispatch.decide(with_new_option(call), backend)
        assert served_by == "fallback", (backend, op)
        assert any("new_feature=1" in r and "not implemented" in r for r in reasons), (backend, op, reasons)
        # at its default value the new option changes nothing
        assert dispatch.decide(with_new_option(call, 0), backend)[2] == plain[2]


def test_a_new_option_reaches_strict_mode_as_an_error():
    if "triton" not in in_tree_backends():
        pytest.skip("triton backend unavailable")
    call = with_new_option(sample_calls()["moe_combine"])
    with mo.strict(), pytest.raises(mo.StrictFallbackError, match="new_feature"):
        dispatch.dispatch(call, lambda c: None, backend="triton")


class _Counting(mo.OpImpl):
    op = "moe_combine"
    dtypes = (torch.float32,)
    seen = 0

    def extra_reasons(self, call):
        type(self).seen += 1
        return []

    def forward(self, call):
        return torch.zeros(call.num_tokens, call.expert_out.shape[1])


class _CountingBackend(mo.Backend):
    name = "counting"

    def load(self):
        return {"moe_combine": _Counting()}


def test_decisions_are_cached_by_signature():
    mo.register_backend(_CountingBackend())
    try:
        call = sample_calls()["moe_combine"]
        _Counting.seen = 0
        for _ in range(3):
            assert dispatch.decide(call, "counting")[2] == "kernel"
        assert _Counting.seen == 1
        half = dataclasses.replace(call, expert_out=call.expert_out.half())
        name, impl, served_by, reasons = dispatch.decide(half, "counting")
        assert served_by == "fallback" and any("dtype float16" in r for r in reasons)
        assert _Counting.seen == 2
    finally:
        mo.unregister_backend("counting")


def test_cached_decisions_follow_the_implementation_state():
    """A cached decision is reused only while the implementation's ``state_key()`` is the one it was
    made in (an interpreter turned on or off); a state that raises decides without the cache."""
    class Stateful(_Counting):
        state = 0

        def state_key(self):
            if type(self).state is None:
                raise RuntimeError("no state")
            return type(self).state

        def extra_reasons(self, call):
            type(self).seen += 1
            return ["state 1 declines"] if type(self).state == 1 else []

    class Backend(_CountingBackend):
        name = "stateful"

        def load(self):
            return {"moe_combine": Stateful()}

    mo.register_backend(Backend())
    try:
        call = sample_calls()["moe_combine"]
        Stateful.seen = 0
        assert dispatch.decide(call, "stateful")[2] == "kernel"
        assert dispatch.decide(call, "stateful")[2] == "kernel"
        assert Stateful.seen == 1
        Stateful.state = 1
        assert dispatch.decide(call, "stateful")[2:] == ("fallback", ("state 1 declines",))
        assert Stateful.seen == 2
        Stateful.state = 0
        assert dispatch.decide(call, "stateful")[2] == "kernel"
        assert Stateful.seen == 3
        Stateful.state = None
        assert dispatch.decide(call, "stateful")[2] == "kernel"
        assert dispatch.decide(call, "stateful")[2] == "kernel"
        assert Stateful.seen == 5
    finally:
        mo.unregister_backend("stateful")


def test_declared_limits_and_devices_give_reasons():
    class Limited(_Counting):
        limits = {"tokens": 4}
        device_types = ("cuda",)

    call = sample_calls()["moe_combine"]
    reasons = Limited().declared_reasons(call)
    assert any("tokens = 6 is over this kernel's limit of 4" in r for r in reasons)
    assert any("device 'cpu'" in r for r in reasons)


def test_plugin_api_major_version_is_checked():
    class Future(_CountingBackend):
        name = "future"
        api_version = "1.0"

    class Minor(_CountingBackend):
        name = "minor"
        api_version = mo.API_VERSION.split(".")[0] + ".99"

    mo.register_backend(Future())
    mo.register_backend(Minor())
    try:
        info = mo.available_backends()
        assert not info["future"]["available"]
        assert "plugin API 1.0" in info["future"]["reason"] and mo.API_VERSION in info["future"]["reason"]
        assert info["minor"]["available"]
        x = torch.zeros(2, 4)
        with pytest.raises(mo.BackendError, match="plugin API"):
            mo.moe_combine(x, torch.zeros(2, dtype=torch.int32), torch.ones(2, 1), backend="future")
    finally:
        mo.unregister_backend("future")
        mo.unregister_backend("minor")


def test_capabilities_are_listed():
    if "triton" not in in_tree_backends():
        pytest.skip("triton backend unavailable")
    caps = mo.available_backends()["triton"]["capabilities"]
    assert "forced_expert_ids" in caps["moe_gating"]["options"]
    assert "partial_replay" not in caps["moe_gating"]["options"]
    assert caps["moe_forward"]["supports_autograd"] is True
