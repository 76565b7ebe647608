"""mojo-opset bench --quant on the CPU (tiny shapes): quantized against float in one run."""
import json

import pytest

from mojo_opset.tools.bench_quant import parse_schemes
from mojo_opset.tools.cli import main


def test_bench_quant_cpu(tmp_path, capsys):
    js = tmp_path / "q.json"
    argv = ["bench", "--quant", "w8a8_int8,w8a16_int8,w4a16_int4", "--models", "tiny", "--tokens", "1,3",
            "--no-progress", "--min-time", "0", "--json", str(js)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "quantized MoE forward" in out and "w8a8_int8" in out
    too_wide = [ln for ln in out.splitlines() if len(ln) > 100]
    assert not too_wide, too_wide[:3]
    data = json.loads(js.read_text())
    res = data["results"]
    assert {r["scheme"] for r in res} == {"bfloat16", "w8a8_int8", "w8a16_int8", "w4a16_int4"}
    ok = [r for r in res if r["scheme"] == "w8a8_int8"]
    assert len(ok) == 2 and all(r["ms"] > 0 and 0 < r["bytes"] and r["rel_err_vs_float"] < 0.1 for r in ok)
    # the scheme reads about half the bytes of bf16 (codes + per-channel scales)
    fl = {r["T"]: r for r in res if r["scheme"] == "bfloat16"}
    assert all(r["bytes"] < 0.6 * fl[r["T"]]["bytes"] for r in ok)
    # tiny's I = 64 is not a multiple of the default int4 group: reported, not fatal
    assert all("error" in r for r in res if r["scheme"] == "w4a16_int4")


def test_scheme_names():
    assert parse_schemes("all")[0] == "w8a8_int8" and len(parse_schemes("all")) == 5
    with pytest.raises(ValueError, match="unknown scheme 'w3'"):
        parse_schemes("w8a8_int8,w3")
