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
    assert set(caps) == {"moe_gating", "moe_permute", "moe_experts", "moe_combine", "moe_forward", "quant_moe_forward"}
    assert data["selection"]["cpu"]["moe_forward"] == "torch"


def test_info_json_to_stdout(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"environment", "backends", "capabilities", "selection"}


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "compare" in capsys.readouterr().out
