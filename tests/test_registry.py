"""Backend discovery, selection precedence, strict mode, fallback bookkeeping and plugin isolation."""
import logging
import os
import sys
import textwrap

import pytest
import torch

import mojo_opset as mo
from mojo_opset import registry

VENDOR_SRC = os.path.join(os.path.dirname(__file__), "vendor_plugin")


def _install_dist(tmp_path, dist, entry_points: dict[str, str]):
    """Write a ``.dist-info`` on sys.path so importlib.metadata discovers its entry points."""
    info = tmp_path / f"{dist}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    lines = ["[mojo_opset.backends]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A sys.path entry for throw-away plugin distributions; backends re-discovered around the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    mo.refresh_backends()
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith(("mojo_vendor_demo", "mojo_broken_plugin"))]:
        del sys.modules[mod]
    monkeypatch.undo()
    mo.refresh_backends()


@pytest.fixture
def demo_vendor(plugin_path, monkeypatch):
    """The out-of-tree demo vendor package (tests/vendor_plugin), discovered through its entry point."""
    monkeypatch.syspath_prepend(VENDOR_SRC)
    _install_dist(plugin_path, "mojo_vendor_demo", {"demo": "mojo_vendor_demo:DemoBackend"})
    monkeypatch.setenv("MOJO_VENDOR_DEMO", "1")
    mo.refresh_backends()
    import mojo_vendor_demo

    for k in mojo_vendor_demo.CALLS:
        mojo_vendor_demo.CALLS[k] = 0
    return mojo_vendor_demo


def _problem(T=6, H=8, E=4, K=2, I=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(T, H), mk(E, H), mk(E, 2 * I, H), mk(E, H, I), K


def test_reference_always_listed():
    av = mo.available_backends()
    assert av["torch"]["available"] and set(av["torch"]["ops"]) == set(mo.OPS)


def test_vendor_plugin_discovered_and_selected_by_env(demo_vendor, monkeypatch):
    av = mo.available_backends()
    assert av["demo"]["available"], av["demo"]
    assert av["demo"]["ops"] == ["moe_combine", "moe_gating"]
    x, gw, w13, w2, K = _problem()
    ref = mo.moe_forward(x, gw, w13, w2, K, backend="torch")
    monkeypatch.setenv("MOJO_BACKEND", "demo")
    with mo.strict():
        y = mo.moe_forward(x, gw, w13, w2, K)
    torch.testing.assert_close(y, ref)
    assert demo_vendor.CALLS == {"moe_combine": 1, "moe_gating": 1}
    last = mo.last_served()
    assert last["moe_combine"] == {"backend": "demo", "served_by": "kernel", "reasons": []}
    assert last["moe_gating"]["served_by"] == "kernel"
    # ops the vendor does not override run the reference, reported as "no override"
    assert last["moe_experts"]["served_by"] == "no override"
    assert last["moe_forward"]["served_by"] == "no override"


def test_vendor_plugin_passes_compare(demo_vendor, capsys, tmp_path):
    """The demo serves what it declares exactly as the reference does, edge cases (T = 0) included."""
    import json

    from mojo_opset.cli import main
    js = tmp_path / "demo.json"
    rc = main(["compare", "--backends", "demo", "--no-progress", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    cases = json.loads(js.read_text())["cases"]
    assert cases and all(c["status"] == "PASS" for c in cases), out
    served = {(c["op"], c["shape"]["T"]) for c in cases if c["served_by"] == "kernel"}
    assert ("moe_gating", 0) in served and ("moe_combine", 0) in served


def test_vendor_fallback_with_reason_and_counter(demo_vendor, caplog):
    x, gw, w13, w2, K = _problem(dtype=torch.float16)
    ref = mo.moe_forward(x, gw, w13, w2, K, backend="torch")
    with caplog.at_level(logging.WARNING, logger="mojo_opset"):
        for _ in range(3):
            y = mo.moe_forward(x, gw, w13, w2, K, backend="demo")
    torch.testing.assert_close(y, ref)
    rec = mo.last_served("moe_combine")
    assert rec["served_by"] == "fallback" and "float16" in rec["reasons"][0]
    counts = mo.fallback_counts()
    key = ("moe_combine", "demo", rec["reasons"][0])
    assert counts[key] == 3
    assert demo_vendor.CALLS["moe_combine"] == 0
    # logged once per (op, backend, reason), not once per call
    assert sum("moe_combine" in r.getMessage() for r in caplog.records) == 1
    assert "demo" in str(mo.explain()) and "float16" in str(mo.explain())


def test_strict_mode_raises_naming_reasons(demo_vendor, monkeypatch):
    x, gw, w13, w2, K = _problem()
    forced = torch.tensor([[0, 1]] * x.shape[0])
    with mo.strict(), pytest.raises(mo.StrictFallbackError, match="forced_expert_ids"):
        mo.moe_gating(x, gw, K, forced_expert_ids=forced, backend="demo")
    monkeypatch.setenv("MOJO_STRICT", "1")
    with pytest.raises(mo.StrictFallbackError, match="sigmoid"):
        mo.moe_gating(x, gw, K, score_func="sigmoid", backend="demo")
    with mo.strict(False):  # the context overrides the env var
        mo.moe_gating(x, gw, K, score_func="sigmoid", backend="demo")
    assert mo.last_served("moe_gating")["served_by"] == "fallback"


def test_selection_precedence(demo_vendor, monkeypatch):
    x, gw, w13, w2, K = _problem()
    monkeypatch.setenv("MOJO_BACKEND", "torch")
    mo.moe_gating(x, gw, K)
    assert mo.last_served("moe_gating")["backend"] == "torch"
    monkeypatch.setenv("MOJO_BACKEND_MOE_GATING", "demo")      # per-op env beats MOJO_BACKEND
    mo.moe_gating(x, gw, K)
    assert mo.last_served("moe_gating")["backend"] == "demo"
    with mo.use_backend("torch"):                               # context beats env
        mo.moe_gating(x, gw, K)
        assert mo.last_served("moe_gating")["backend"] == "torch"
        mo.moe_gating(x, gw, K, backend="demo")                 # argument beats context
        assert mo.last_served("moe_gating")["backend"] == "demo"
    with mo.use_backend("demo", ops="moe_combine"):             # per-op context
        mo.moe_forward(x, gw, w13, w2, K)
        assert mo.last_served("moe_combine")["backend"] == "demo"
        assert mo.last_served("moe_gating")["backend"] == "demo"  # from MOJO_BACKEND_MOE_GATING
        assert mo.last_served("moe_permute")["backend"] == "torch"


def test_env_changes_take_effect_without_reimport(demo_vendor, monkeypatch):
    x, gw, _, _, K = _problem()
    for name in ("demo", "torch", "demo"):
        monkeypatch.setenv("MOJO_BACKEND", name)
        mo.moe_gating(x, gw, K)
        assert mo.last_served("moe_gating")["backend"] == name


def test_default_for_cpu_is_reference(demo_vendor, monkeypatch):
    monkeypatch.delenv("MOJO_BACKEND", raising=False)
    x, gw, _, _, K = _problem()
    mo.moe_gating(x, gw, K)
    assert mo.last_served("moe_gating")["backend"] == "torch"
    assert mo.select_backend("moe_gating", "cpu") == "torch"


def test_unknown_backend_error_lists_registered(demo_vendor):
    x, gw, _, _, K = _problem()
    with pytest.raises(mo.BackendError) as e:
        mo.moe_gating(x, gw, K, backend="nosuch")
    msg = str(e.value)
    assert "nosuch" in msg and "torch (available)" in msg and "demo (available)" in msg


def test_unavailable_backend_error_gives_reason(demo_vendor, monkeypatch):
    monkeypatch.setenv("MOJO_VENDOR_DEMO", "0")
    mo.refresh_backends()
    assert not mo.available_backends()["demo"]["available"]
    x, gw, _, _, K = _problem()
    with pytest.raises(mo.BackendError, match="MOJO_VENDOR_DEMO=1"):
        mo.moe_gating(x, gw, K, backend="demo")


def test_broken_plugin_is_isolated(plugin_path):
    pkg = plugin_path / "mojo_broken_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('libvendor.so: cannot open shared object file')\n")
    _install_dist(plugin_path, "mojo_broken_plugin",
                  {"broken": "mojo_broken_plugin:Backend", "missing": "mojo_no_such_module:Backend"})
    mo.refresh_backends()
    av = mo.available_backends()  # must not raise
    assert not av["broken"]["available"] and "libvendor.so" in av["broken"]["reason"]
    assert not av["missing"]["available"] and "mojo_no_such_module" in av["missing"]["reason"]
    x, gw, _, _, K = _problem()
    mo.moe_gating(x, gw, K)  # other backends unaffected
    with pytest.raises(mo.BackendError, match="libvendor.so"):
        mo.moe_gating(x, gw, K, backend="broken")


def test_plugin_whose_probe_raises_is_unavailable():
    class Flaky(mo.Backend):
        name = "flaky"

        def unavailable_reason(self):
            raise OSError("driver exploded")

    mo.register_backend(Flaky())
    try:
        av = mo.available_backends()["flaky"]
        assert not av["available"] and "driver exploded" in av["reason"]
    finally:
        mo.unregister_backend("flaky")


def test_device_not_served_is_a_fallback_reason():
    class CudaOnly(mo.Backend):
        name = "cudaonly"
        device_types = ("cuda",)

        def load(self):
            return {"moe_combine": mo.op_impl("moe_combine", lambda call: 1 / 0)}

    mo.register_backend(CudaOnly())
    try:
        x, gw, w13, w2, K = _problem()
        mo.moe_forward(x, gw, w13, w2, K, backend="cudaonly")
        rec = mo.last_served("moe_combine")
        assert rec["served_by"] == "fallback" and "device 'cpu'" in rec["reasons"][0]
    finally:
        mo.unregister_backend("cudaonly")


def test_autograd_declined_when_impl_has_no_backward(demo_vendor):
    x, gw, w13, w2, K = _problem()
    w13.requires_grad_(True)
    y = mo.moe_forward(x, gw, w13, w2, K, backend="demo")
    rec = mo.last_served("moe_combine")
    assert rec["served_by"] == "fallback" and "autograd" in rec["reasons"][0]
    y.sum().backward()
    assert w13.grad is not None
    # gating kernels need no backward: the core rebuilds the weights from the kernel's ids
    gw.requires_grad_(True)
    ids, w = mo.moe_gating(x, gw, K, backend="demo")
    assert mo.last_served("moe_gating")["served_by"] == "kernel"
    w.sum().backward()
    assert gw.grad is not None and torch.isfinite(gw.grad).all()


def test_capability_check_that_raises_becomes_a_reason():
    def bad_reasons(call):
        raise KeyError("oops")

    class B(mo.Backend):
        name = "badcheck"

        def load(self):
            return {"moe_combine": mo.op_impl("moe_combine", lambda call: None, bad_reasons)}

    mo.register_backend(B())
    try:
        x, gw, w13, w2, K = _problem()
        mo.moe_forward(x, gw, w13, w2, K, backend="badcheck")
        assert "capability check raised KeyError" in mo.last_served("moe_combine")["reasons"][0]
    finally:
        mo.unregister_backend("badcheck")


def test_use_backend_rejects_unknown_op():
    with pytest.raises(ValueError, match="unknown op"):
        with mo.use_backend("torch", ops="moe_nothing"):
            pass


def test_core_never_imports_backends():
    """SPEC §2: the core finds backends only through entry points."""
    root = os.path.join(os.path.dirname(__file__), "..", "mojo_opset")
    offenders = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(dirpath, f)).read()
                for name in ("mojo_opset_triton", "mojo_opset_ttx", "mojo_opset_npu"):
                    if f"import {name}" in text or f"from {name}" in text:
                        offenders.append((f, name))
    assert not offenders


def test_backends_never_import_each_other():
    root = os.path.join(os.path.dirname(__file__), "..", "backends")
    names = [d for d in os.listdir(root) if d.startswith("mojo_opset_")]
    offenders = []
    for own in names:
        for dirpath, _, files in os.walk(os.path.join(root, own)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(dirpath, f)).read()
                    for other in names:
                        if other != own and (f"import {other}" in text or f"from {other}" in text):
                            offenders.append((own, f, other))
    assert not offenders
