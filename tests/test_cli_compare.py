"""mojo-opset compare: verdicts, served_by, reports and exit status, with fake backends."""
import json
import xml.etree.ElementTree as ET

import pytest
import torch

from mojo_opset.testing.routing import compare_routing
from mojo_opset.testing.accuracy import EXACT, Tolerance, compare_tensors
from mojo_opset.tools.cli import main

import _fake_backends as fb

CASE_KEYS = {"op", "backend", "dtype", "shape", "options", "served_by", "served", "reasons", "max_abs", "max_rel",
             "mismatch", "tolerance", "status"}
PARTS = {"moe_gating", "moe_permute", "moe_experts", "moe_combine"}


@pytest.fixture
def fakes():
    names = []

    def add(*backends):
        names.extend(fb.register(*backends))
        return names
    yield add
    fb.unregister(names)


def _run(capsys, *argv):
    rc = main(["compare", "--no-progress", *argv])
    return rc, capsys.readouterr().out


def test_correct_backend_passes_and_reports_kernels(fakes, capsys, tmp_path):
    fakes(fb.good())
    js, xml = tmp_path / "c.json", tmp_path / "c.xml"
    rc, out = _run(capsys, "--backends", "fake_good", "--dtypes", "fp32", "--ops",
                   "gating,permute,experts,combine,forward", "--json", str(js), "--junit", str(xml))
    assert rc == 0, out
    data = json.loads(js.read_text())
    assert set(data) == {"environment", "cases"}
    assert data["environment"]["versions"]["torch"] == torch.__version__
    cases = data["cases"]
    assert len(cases) > 30
    for c in cases:
        assert set(c) == CASE_KEYS
        assert c["status"] == "PASS", c
        assert c["backend"] == "fake_good" and c["dtype"] == "float32"
        if c["op"] == "moe_forward":
            # the backend does not override the forward: the reference composes its kernels, and the
            # report says so, as mo.last_served() and `mojo-opset info` do
            assert c["served_by"] == "no override", c
            assert c["served"]["moe_forward"]["served_by"] == "no override"
            assert {op: rec["served_by"] for op, rec in c["served"].items() if op != "moe_forward"} == \
                {op: "kernel" for op in PARTS}, c
        else:
            assert c["served_by"] == "kernel", c
            assert c["served"] == {c["op"]: {"served_by": "kernel", "reasons": []}}, c
    ops = {c["op"] for c in cases}
    assert ops == {"moe_gating", "moe_permute", "moe_experts", "moe_combine", "moe_forward"}
    # edge cases are in the matrix
    assert any(c["shape"]["T"] == 0 for c in cases) and any(c["shape"]["T"] == 1 for c in cases)
    assert {"one_expert", "near_ties", "nan_row"} <= {c["options"].get("edge") for c in cases}
    root = ET.parse(xml).getroot()
    assert root.get("failures") == "0" and int(root.get("tests")) == len(cases)
    assert "PASS" in out and "0 failed" in out
    assert "parts: gating=kernel, permute=kernel, experts=kernel, combine=kernel" in out


def test_broken_kernel_fails_with_readable_report(fakes, capsys, tmp_path):
    fakes(fb.broken_experts())
    js, xml = tmp_path / "c.json", tmp_path / "c.xml"
    rc, out = _run(capsys, "--backends", "fake_broken", "--dtypes", "fp32", "--ops", "experts,forward",
                   "--json", str(js), "--junit", str(xml))
    assert rc == 1
    assert "FAILURES" in out and "fake_broken" in out
    assert "moe_experts [fake_broken] float32" in out
    assert "elements outside atol=0.0001 rtol=0.0001" in out
    cases = json.loads(js.read_text())["cases"]
    experts = [c for c in cases if c["op"] == "moe_experts" and c["shape"]["T"] > 0]
    assert experts and all(c["status"] == "FAIL" and c["served_by"] == "kernel" for c in experts)
    assert all(c["mismatch"] > 0.5 and c["max_abs"] > 1e-3 for c in experts)
    # the forward composes the broken experts kernel (no forward override): it must fail too
    fwd = [c for c in cases if c["op"] == "moe_forward" and c["shape"]["T"] > 0]
    assert fwd and all(c["status"] == "FAIL" for c in fwd)
    # T = 0 has nothing to get wrong
    assert all(c["status"] == "PASS" for c in cases if c["shape"]["T"] == 0)
    failures = ET.parse(xml).getroot().iter("failure")
    assert any("outside" in (f.get("message") or "") for f in failures)


def test_wrong_routing_fails_on_ids(fakes, capsys, tmp_path):
    fakes(fb.broken_routing())
    js = tmp_path / "c.json"
    rc, out = _run(capsys, "--backends", "fake_bad_routing", "--dtypes", "fp32", "--ops", "gating", "--json", str(js))
    assert rc == 1
    assert "topk_ids:" in out and "not a near-tie" in out
    cases = json.loads(js.read_text())["cases"]
    forced = [c for c in cases if c["options"].get("forced")]
    assert forced and all(c["status"] == "FAIL" for c in forced)  # forced ids must come back unchanged
    assert all(c["status"] == "PASS" for c in cases if c["shape"]["T"] == 0)


def test_declined_calls_are_fallbacks_and_missing_ops_no_override(fakes, capsys, tmp_path):
    fakes(fb.declining())
    js = tmp_path / "c.json"
    rc, out = _run(capsys, "--backends", "fake_declining", "--dtypes", "fp32", "--ops", "experts,combine",
                   "--quick", "--json", str(js))
    assert rc == 0, out
    cases = {c["op"]: c for c in json.loads(js.read_text())["cases"]}
    assert cases["moe_experts"]["served_by"] == "fallback"
    assert cases["moe_experts"]["reasons"] == ["moe_experts: no thanks"]
    assert cases["moe_combine"]["served_by"] == "no override"
    assert "fake_declining: moe_experts: no thanks" in out


def test_raising_kernel_is_a_failure(fakes, capsys):
    fakes(fb.raising())
    rc, out = _run(capsys, "--backends", "fake_raising", "--dtypes", "fp32", "--ops", "combine", "--quick")
    assert rc == 1
    assert "raised RuntimeError: kernel exploded" in out


def test_usage_errors_exit_2(fakes, capsys):
    assert main(["compare", "--backends", "nope"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
    assert main(["compare", "--backends", "tritn"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'triton'?" in err and max(map(len, err.splitlines())) <= 100
    assert main(["compare", "--ops", "gatng"]) == 2
    assert "did you mean 'gating'?" in capsys.readouterr().err
    assert main(["compare", "--dtypes", "bf61"]) == 2
    assert "did you mean 'bf16'?" in capsys.readouterr().err
    assert main(["compare", "--backends", "torch"]) == 2
    fakes(fb.good())
    assert main(["compare", "--backends", "fake_good", "--dtypes", "fp64"]) == 2
    assert main(["compare", "--backends", "fake_good", "--ops", "softmax"]) == 2
    if not torch.cuda.is_available():
        assert main(["compare", "--device", "cuda"]) == 2


def test_list_shows_matrix(fakes, capsys):
    fakes(fb.good())
    rc, out = _run(capsys, "--backends", "fake_good", "--list")
    assert rc == 0
    for needle in ("moe_gating", "g4/2:top2_sum", "forced", "align16", "quant_moe_forward", "w4a8_int4"):
        assert needle in out


# --------------------------------------------------------------------------- routing comparison

def _scores(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_routing_accepts_swaps_only_at_near_ties():
    s = _scores([[0.5, 0.3, 0.3 * (1 + 1e-7), 0.1], [0.5, 0.3, 0.2, 0.0]])
    ref = torch.tensor([[0, 2], [0, 1]], dtype=torch.int32)
    near = torch.tensor([[0, 1], [0, 1]], dtype=torch.int32)
    d, accepted = compare_routing(near, ref, s)
    assert d.ok and accepted == 1
    clear = torch.tensor([[0, 2], [0, 2]], dtype=torch.int32)
    d, _ = compare_routing(clear, ref, s)
    assert not d.ok and d.bad == 1 and "row 1" in d.note and "not a near-tie" in d.note
    # half-precision logits widen the margin
    d, _ = compare_routing(torch.tensor([[0, 2], [0, 1]], dtype=torch.int32), ref,
                           _scores([[0.5, 0.3, 0.3 * (1 + 1e-3), 0.1], [0.5, 0.3, 0.2, 0.0]]),
                           logits_dtype=torch.bfloat16)
    assert d.ok


def test_routing_exact_ties_go_to_the_lower_id():
    s = _scores([[0.4, 0.4, 0.2]])
    d, _ = compare_routing(torch.tensor([[1, 0]], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32), s)
    assert not d.ok and "exact tie" in d.note
    nan = _scores([[float("nan")] * 3])
    d, _ = compare_routing(torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32), nan)
    assert d.ok
    d, _ = compare_routing(torch.tensor([[0, 2]], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32), nan)
    assert not d.ok


def test_routing_structural_errors():
    s = _scores([[0.5, 0.3, 0.2]])
    ref = torch.tensor([[0, 1]], dtype=torch.int32)
    d, _ = compare_routing(torch.tensor([[0, 3]], dtype=torch.int32), ref, s)
    assert "out of range" in d.note
    d, _ = compare_routing(torch.tensor([[0, 0]], dtype=torch.int32), ref, s)
    assert "repeated" in d.note
    d, _ = compare_routing(ref.long(), ref, s)
    assert not d.ok and "int32" in d.describe()
    d, _ = compare_routing(torch.tensor([[1, 0]], dtype=torch.int32), ref, s, forced=True)
    assert not d.ok and "forced" in d.note


def test_routing_group_near_tie():
    # 2 groups of 2, keep 1: group scores (max) 0.6 vs 0.6*(1+1e-7): either group may be kept
    s = _scores([[0.6, 0.1, 0.6 * (1 + 1e-7), 0.05]])
    ref = torch.tensor([[2]], dtype=torch.int32)
    kw = dict(num_expert_groups=2, num_limited_groups=1, group_score="max")
    d, acc = compare_routing(torch.tensor([[0]], dtype=torch.int32), ref, s, **kw)
    assert d.ok and acc == 1
    s2 = _scores([[0.6, 0.1, 0.7, 0.05]])
    d, _ = compare_routing(torch.tensor([[0]], dtype=torch.int32), ref, s2, **kw)
    assert not d.ok


def test_compare_tensors_nan_inf_and_mismatch_budget():
    want = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert compare_tensors("t", want.clone(), want, EXACT).ok
    got = want.clone()
    got[1] = 0.0
    d = compare_tensors("t", got, want, EXACT)
    assert not d.ok and d.bad == 1
    got = want.clone()
    got[3] = 2.1
    assert not compare_tensors("t", got, want, Tolerance(1e-3, 1e-3)).ok
    assert compare_tensors("t", got, want, Tolerance(1e-3, 1e-3, max_mismatch=0.25)).ok
    d = compare_tensors("t", got.half(), want, Tolerance(1, 1))
    assert not d.ok and "dtype" in d.describe()


def test_installed_backends_quick(capsys, tmp_path):
    """End to end on whatever in-tree backends are available here (Triton kernels in the interpreter
    on a CPU): the basic fp32 case of every op must pass."""
    import mojo_opset as mo

    avail = [n for n, r in mo.available_backends().items() if r["available"] and n != "torch"]
    if not avail:
        pytest.skip("no backend other than the reference is available")
    js = tmp_path / "c.json"
    rc, out = _run(capsys, "--quick", "--dtypes", "fp32", "--json", str(js))
    assert rc == 0, out
    cases = json.loads(js.read_text())["cases"]
    assert {c["backend"] for c in cases} == set(avail)
    assert all(c["status"] == "PASS" for c in cases)


# --------------------------------------------------------------------------- what served each part

def test_gating_only_plugin_reports_each_part(fakes, capsys, tmp_path):
    """A plugin overriding only the gating: its forward rows name the gating kernel and the
    reference parts, not a bare "no override"."""
    gating = fb.good()._impls["moe_gating"]
    fakes(fb.FakeBackend("fake_gating_only", {"moe_gating": gating}))
    js, xml = tmp_path / "c.json", tmp_path / "c.xml"
    rc, out = _run(capsys, "--backends", "fake_gating_only", "--dtypes", "fp32", "--ops", "gating,forward",
                   "--quick", "--json", str(js), "--junit", str(xml))
    assert rc == 0, out
    cases = {c["op"]: c for c in json.loads(js.read_text())["cases"]}
    assert cases["moe_gating"]["served_by"] == "kernel"
    fwd = cases["moe_forward"]
    assert fwd["served_by"] == "no override"
    assert {op: rec["served_by"] for op, rec in fwd["served"].items()} == {
        "moe_forward": "no override", "moe_gating": "kernel", "moe_permute": "no override",
        "moe_experts": "no override", "moe_combine": "no override"}
    assert "parts: gating=kernel, permute=ref, experts=ref, combine=ref" in out
    props = {p.get("name"): p.get("value") for p in ET.parse(xml).getroot().iter("property")}
    assert props["parts"] == "gating=kernel, permute=ref, experts=ref, combine=ref"


def test_fallback_of_a_part_is_reported(fakes, capsys, tmp_path):
    fakes(fb.declining())
    js = tmp_path / "c.json"
    rc, out = _run(capsys, "--backends", "fake_declining", "--dtypes", "fp32", "--ops", "forward", "--quick",
                   "--json", str(js))
    assert rc == 0, out
    fwd = json.loads(js.read_text())["cases"][0]
    assert fwd["served_by"] == "no override"
    assert fwd["served"]["moe_experts"] == {"served_by": "fallback", "reasons": ["no thanks"]}
    assert "moe_experts: no thanks" in fwd["reasons"]
    assert "experts=fallback" in out and "fake_declining: moe_experts: no thanks -> 1" in out


def test_nothing_to_compare_is_not_a_pass(monkeypatch, capsys):
    """With every backend unavailable (e.g. triton without numpy), compare says why, once per
    reason, and exits 1: a CI job must not pass having compared nothing."""
    import mojo_opset as mo

    why = "triton is not importable (ModuleNotFoundError: No module named 'numpy'); pip install 'mojo-opset[triton]'"
    fake = {"torch": {"available": True, "reason": None, "source": "core", "ops": []},
            "triton": {"available": False, "reason": why, "source": "entry point", "ops": []},
            "ttx": {"available": False, "reason": why, "source": "entry point", "ops": []}}
    monkeypatch.setattr(mo, "available_backends", lambda: fake)
    rc = main(["compare", "--no-progress", "--quick"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "nothing compared" in err
    assert out.count("mojo-opset[triton]") == 1 and "triton, ttx: unavailable" in out


def test_tables_fit_100_columns(fakes, capsys):
    """Every line of the report fits 100 columns, whatever the options, parts and reasons."""
    long_reason = "this backend declines every call because " + "of a very long explanation " * 6
    fakes(fb.FakeBackend("fake_verbose", {
        "moe_experts": fb.mo.op_impl("moe_experts", fb._experts, reasons=lambda call: [long_reason])}))
    rc, out = _run(capsys, "--backends", "fake_verbose", "--dtypes", "fp32", "--ops", "gating,experts,forward")
    assert rc == 0, out
    assert "g4/2:top2_sum" in out and long_reason.split()[0] in out
    too_wide = [ln for ln in out.splitlines() if len(ln) > 100]
    assert not too_wide, too_wide[:3]
