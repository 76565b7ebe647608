"""The command-line tools' building blocks: tables within the report width; which implementation
served each part of a call."""
from mojo_opset.tools.served import summarize
from mojo_opset.tools.table import render, wrap_text


def test_render_wraps_to_the_width():
    rows = [["gating", "sigmoid, norm, x2.5, ebias, g4/2:top2_sum, forced", "1e-6/1e-5"],
            ["forward", "softmax", "0.001/0.002 <=1e-4"]]
    text = render(["op", "options", "atol/rtol"], rows, width=40, wrap={1, 2},
                  notes=[None, "parts: gating=kernel, permute=kernel, experts=ref, combine=kernel"], note_indent=4)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 40
    assert "g4/2:top2_sum," in text                       # wrapped at a comma, the word kept whole
    assert any(ln.startswith("    parts: gating=kernel") for ln in lines)
    assert render(["a"], [["x" * 50]], width=20, wrap={0}).splitlines()[2] == "x" * 20   # a long word is cut
    assert wrap_text("short", 10) == ["short"]


def test_served_names_the_op_and_each_part():
    last = {"moe_forward": {"backend": "p", "served_by": "no override", "reasons": []},
            "moe_gating": {"backend": "p", "served_by": "kernel", "reasons": []},
            "moe_permute": {"backend": "p", "served_by": "no override", "reasons": []},
            "moe_experts": {"backend": "p", "served_by": "fallback", "reasons": ["dtype float64"]},
            "moe_combine": {"backend": "p", "served_by": "kernel", "reasons": []}}
    s = summarize(last, "moe_forward")
    assert s.served_by == "no override"
    assert s.parts_text() == "gating=kernel, permute=ref, experts=fallback, combine=kernel"
    assert s.reasons == ["moe_experts: dtype float64"]
    assert list(s.records) == ["moe_forward", "moe_gating", "moe_permute", "moe_experts", "moe_combine"]
    whole = summarize({"moe_forward": {"served_by": "kernel", "reasons": []}}, "moe_forward")
    assert whole.label() == "kernel" and whole.parts_text() == ""
    assert summarize({}, "moe_combine").served_by == "not dispatched"
