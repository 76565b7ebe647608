"""mojo-opset info: versions, devices, backends with reasons, and the capability table."""
import json
import platform

import torch

from mojo_opset.tools.cli import main

import _fake_backends as fb


def test_info_text_and_json(capsys, tmp_path):
    names = fb.register(fb.declining())
    try:
        assert main(["info"]) == 0
        out = capsys.readouterr().out
        assert f"python     {platform.python_version()}" in out
        assert torch.__version__ in out
        assert "capabilities" in out and "fake_declining" in out
        line = next(l for l in out.splitlines() if l.startswith("moe_experts"))
        assert "yes" in line
        path = tmp_path / "info.json"
        assert main(["info", "--json", str(path)]) == 0
        data = json.loads(path.read_text())
    finally:
        fb.unregister(names)
    assert data["environment"]["versions"]["torch"] == torch.__version__
    assert any(d["type"] == "cpu" for d in data["environment"]["devices"])
    be = data["backends"]
    assert be["torch"]["available"] and be["fake_declining"]["available"]
    for name, rec in be.items():  # an unavailable backend always says why
        assert rec["available"] or rec["reason"]
    caps = data["capabilities"]
    assert caps["moe_experts"]["fake_declining"] == "override"
    assert caps["moe_gating"]["fake_declining"] == "reference"
    assert caps["moe_gating"]["torch"] == "reference"
    import mojo_opset as mo

    assert set(caps) == set(mo.OPS)
    assert {"moe_gating", "moe_permute", "moe_experts", "moe_combine", "moe_forward", "quant_moe_forward"} <= set(caps)
    assert data["selection"]["cpu"]["moe_forward"] == "torch"


def test_info_json_to_stdout(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"environment", "backends", "capabilities", "selection"}


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "compare" in capsys.readouterr().out


def test_info_fits_100_columns(capsys):
    """A backend with a long reason and many versions still fits the report's width; the JSON
    keeps the reason whole."""
    class Verbose(fb.FakeBackend):
        def unavailable_reason(self):
            return "needs a device this machine lacks; " + "install the vendor runtime and its driver " * 5

        def versions(self):
            return {"runtime": "1.2.3-very-long-build-tag+abcdef0123456789", "driver": "555.55.55", "firmware": "7"}

    names = fb.register(Verbose("fake_verbose_backend_name", {}))
    try:
        assert main(["info"]) == 0
        out = capsys.readouterr().out
        assert main(["info", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
    finally:
        fb.unregister(names)
    too_wide = [ln for ln in out.splitlines() if len(ln) > 100]
    assert not too_wide, too_wide[:3]
    assert "install the vendor runtime" in out
    assert data["backends"]["fake_verbose_backend_name"]["reason"].count("install the vendor runtime") == 5


def test_misspelled_mojo_backend_is_one_error_and_nonzero(capsys, monkeypatch):
    monkeypatch.setenv("MOJO_BACKEND", "tritn")
    assert main(["info"]) == 2
    out = capsys.readouterr().out
    assert "capabilities" in out                              # the rest of the report still prints
    assert out.count("unknown backend 'tritn'") == 1
    assert "did you mean 'triton'?" in out
    assert main(["info", "--json"]) == 2
    sel = json.loads(capsys.readouterr().out)["selection"]
    assert all("tritn" in v["error"] for v in sel.values())
