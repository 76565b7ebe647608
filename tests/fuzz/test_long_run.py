"""The sharded long-profile runner: its sums, its failure report, and a real (tiny) run."""
import json

from . import long_run


def _line(backend, prop, ok, T=3, E=8, dtype="float32", error=None, **extra):
    return json.dumps(dict(property=prop, backend=backend, ok=ok, seconds=0.5, case=f"T{T} E{E}", error=error,
                           T=T, E=E, K=2, H=16, I=16, dtype=dtype, grouped=False, score_func="softmax",
                           x_layout="contiguous", w_layout="offset", nan=False, inf=False, shared=False, **extra))


def test_summarize_counts_per_backend_and_property(tmp_path):
    (tmp_path / "triton-0.jsonl").write_text("\n".join([
        _line("triton", "forward", True, T=0), _line("triton", "forward", True, T=300, E=299, dtype="bfloat16"),
        _line("triton", "forward", False, error="AssertionError: ids differ"),
        _line("triton", "quant", True, scheme="w8a8_int8")]) + "\n")
    (tmp_path / "ttx-0.jsonl").write_text(_line("ttx", "forward", True) + "\n" + '{"property": "forw')  # cut line
    result = long_run.summarize([tmp_path])
    groups = {(g["backend"], g["property"]): g for g in result["groups"]}
    fwd = groups[("triton", "forward")]
    assert (fwd["cases"], fwd["passed"], fwd["failed"]) == (3, 2, 1)
    assert (fwd["max_T"], fwd["max_E"], fwd["T0"]) == (300, 299, 1)
    assert fwd["dtypes"] == {"float32": 2, "bfloat16": 1}
    assert fwd["failures"][0]["error"].startswith("AssertionError") and fwd["failures"][0]["shard"] == "triton-0"
    assert groups[("triton", "quant")]["schemes"] == {"w8a8_int8": 1}
    assert groups[("ttx", "forward")]["cases"] == 1
    text = long_run.report(result)
    assert "| triton | forward | 3 | 2 | 1 |" in text and "FAIL triton forward [triton-0] T3 E8" in text


def test_run_executes_cases_and_writes_summary(tmp_path, monkeypatch):
    """A real run: one shard fuzzing the reference against itself (validation property: quick)."""
    out = tmp_path / "run"
    rc = long_run.main(["--backends", "torch", "--properties", "invalid_ids", "--cases", "3", "--shards", "1",
                        "--time-limit", "300", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0, (out / "torch-0.out").read_text()[-3000:]
    (g,) = summary["groups"]
    assert (g["backend"], g["property"], g["failed"]) == ("torch", "invalid_ids", 0)
    assert g["cases"] >= 3
    assert summary["shards"] == [dict(name="torch-0", returncode=0, stopped_by_limit=False)]


def test_time_limit_stops_shards_without_failing(tmp_path):
    out = tmp_path / "run"
    rc = long_run.main(["--backends", "torch", "--properties", "forward", "--cases", "100000", "--shards", "1",
                        "--time-limit", "0.5", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0
    assert summary["shards"][0]["stopped_by_limit"] is True
    assert all(g["failed"] == 0 for g in summary["groups"])
