"""Selection rules and clear errors of the dispatcher (SPEC §4, §6): use_backend(None), backend ids
(case, aliases, suggestions), MOJO_STRICT and misspelled MOJO_BACKEND_<OP> values, per-thread
introspection, the explain() hint after compiled calls."""
import logging
import threading

import pytest
import torch

import mojo_opset as mo
from mojo_opset import registry


def _layer(T=4, H=16, E=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g), torch.randn(E, H, generator=g)


def test_use_backend_none_lets_the_environment_apply_again(monkeypatch):
    x, gw = _layer()
    monkeypatch.setenv("MOJO_BACKEND", "triton")
    if not mo.available_backends()["triton"]["available"]:
        pytest.skip("triton backend unavailable")
    with mo.use_backend("torch"):
        mo.moe_gating(x, gw, 2)
        assert mo.last_served("moe_gating")["backend"] == "torch"
        with mo.use_backend(None):
            mo.moe_gating(x, gw, 2)
            assert mo.last_served("moe_gating")["backend"] == "triton"
        with mo.use_backend(None, ops="moe_gating"):
            mo.moe_gating(x, gw, 2)
            assert mo.last_served("moe_gating")["backend"] == "triton"


@pytest.mark.parametrize("bad", [1, 2.0, ["torch"]])
def test_backend_argument_must_be_a_string(bad):
    x, gw = _layer()
    with pytest.raises(TypeError, match="backend must be a backend id"):
        mo.moe_gating(x, gw, 2, backend=bad)
    with pytest.raises(TypeError, match="use_backend"):
        with mo.use_backend(bad):
            pass


def test_backend_ids_are_case_insensitive_and_aliases_resolve():
    x, gw = _layer()
    mo.moe_gating(x, gw, 2, backend="TORCH")
    assert mo.last_served("moe_gating")["backend"] == "torch"
    assert registry.canonical_name("Torch_NPU") == "npu"
    info = mo.available_backends()
    assert "ixformer" in info and not info["ixformer"]["available"]
    assert "ixformer" in info["ixformer"]["reason"]
    with pytest.raises(mo.BackendError, match="ixformer"):
        mo.moe_gating(x, gw, 2, backend="IXFORMER")


def test_misspelled_backend_suggests_the_closest_and_stays_short(monkeypatch):
    x, gw = _layer()
    with pytest.raises(mo.BackendError) as err:
        mo.moe_gating(x, gw, 2, backend="tritn")
    msg = str(err.value)
    assert "did you mean 'triton'?" in msg and "backend= argument" in msg
    assert len(msg) < 300
    monkeypatch.setenv("MOJO_BACKEND", "tritn")
    with pytest.raises(mo.BackendError, match="from MOJO_BACKEND.*did you mean 'triton'"):
        mo.moe_gating(x, gw, 2)


@pytest.mark.parametrize("value", ["2", "maybe"])
def test_mojo_strict_must_be_a_flag(monkeypatch, value):
    monkeypatch.setenv("MOJO_STRICT", value)
    with pytest.raises(ValueError, match=f"MOJO_STRICT must be 1 or 0.*{value!r}"):
        mo.is_strict()


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False),
                                            ("no", False)])
def test_mojo_strict_spellings(monkeypatch, value, expected):
    monkeypatch.setenv("MOJO_STRICT", value)
    assert mo.is_strict() is expected


def test_misspelled_per_op_variable_warns_with_the_valid_names(monkeypatch, caplog):
    x, gw = _layer()
    monkeypatch.setenv("MOJO_BACKEND_MOE_GATNG", "torch")
    with caplog.at_level(logging.WARNING, logger="mojo_opset"):
        mo.moe_gating(x, gw, 2)
    text = caplog.text
    assert "MOJO_BACKEND_MOE_GATNG names no op" in text and "MOJO_BACKEND_MOE_GATING" in text


@pytest.mark.parametrize("kw,exc,match", [
    (dict(route_scale=float("nan")), ValueError, "route_scale must be a finite number"),
    (dict(route_scale=float("inf")), ValueError, "route_scale must be a finite number"),
])
def test_routing_values(kw, exc, match):
    x, gw = _layer()
    with pytest.raises(exc, match=match):
        mo.moe_gating(x, gw, 2, **kw)


def test_top_k_must_not_be_a_bool():
    x, gw = _layer()
    with pytest.raises(TypeError, match="top_k must be an int, got bool"):
        mo.moe_gating(x, gw, True)


def test_meta_tensors_propagate_shapes_and_meta_ids_with_cpu_x_are_named():
    x, gw = _layer()
    meta = torch.zeros(4, 2, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="forced_expert_ids is on the meta device"):
        mo.moe_gating(x, gw, 2, forced_expert_ids=meta)
    xm, gm = x.to("meta"), gw.to("meta")
    w13, w2 = torch.empty(4, 8, 16, device="meta"), torch.empty(4, 16, 4, device="meta")
    y = mo.moe_forward(xm, gm, w13, w2, 2, forced_expert_ids=meta)
    assert y.shape == x.shape and y.device.type == "meta"


def test_last_served_is_per_thread():
    x, gw = _layer()
    mo.moe_gating(x, gw, 2, backend="torch")
    seen = {}

    def other():
        seen["before"] = mo.last_served("moe_gating")
        mo.moe_permute(x, torch.zeros(4, 2, dtype=torch.int32), 4)
        seen["after"] = mo.last_served()

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["before"] == {} and set(seen["after"]) == {"moe_permute"}
    assert set(mo.last_served()) == {"moe_gating"}


def test_explain_says_why_it_is_empty_after_a_compiled_call():
    x, gw = _layer()
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: mo.moe_gating(a, b, 2, backend="torch")[1], fullgraph=True, backend="eager")
    f(x, gw)
    text = str(mo.explain())
    assert "torch.compile" in text
