"""mojo-opset bench on the CPU (tiny shapes), and its roofline arithmetic."""
import json

import pytest
import torch

from mojo_opset.tools.bench import spec_summary
from mojo_opset.tools.bench_models import MODELS, fit_to_memory
from mojo_opset.tools.bench_timing import Timer, datasheet_for
from mojo_opset.tools.cli import main


@pytest.fixture
def one_thread():
    """Shared CI cores: one intra-op thread avoids oversubscription stalls in the timed loops."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bench_quick_cpu(tmp_path, capsys, one_thread):
    js, png, md = tmp_path / "b.json", tmp_path / "b.png", tmp_path / "b.md"
    argv = ["bench", "--quick", "--models", "tiny,tiny-grouped", "--tokens", "1,5", "--parts", "gating,experts",
            "--no-progress", "--min-time", "0", "--json", str(js), "--markdown", str(md)]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(png)]
    except ImportError:
        png = None
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "peaks measured" in out and "dispatch overhead" in out and "MoE forward" in out
    data = json.loads(js.read_text())
    assert data["backend"] == "torch" and data["dtype"] == "bfloat16"
    assert data["peaks"]["measured"]["bandwidth_tbs"] > 0 and data["peaks"]["measured"]["bf16_tflops"] > 0
    assert data["dispatch_overhead"]["moe_gating_us"] > 0
    res = data["results"]
    assert not [r for r in res if "error" in r]
    fwd = [r for r in res if r["part"] == "forward"]
    assert {r["path"] for r in fwd} == {"torch", "grouped_mm", "loop"}
    assert {(r["model"], r["T"]) for r in fwd} == {(m, t) for m in ("tiny", "tiny-grouped") for t in (1, 5)}
    for r in fwd:
        assert r["ms"] > 0 and r["tflops"] > 0 and r["gbs"] > 0 and 0 < r["roofline_frac"]
        assert r["mode"] == "eager"  # no CUDA graphs on a CPU
    # tiny: H128 I64 K2; T=1 touches exactly its 2 experts
    r = next(r for r in fwd if r["model"] == "tiny" and r["T"] == 1 and r["path"] == "loop")
    assert r["gbs"] * 1e9 * r["ms"] * 1e-3 == pytest.approx(2 * 3 * 128 * 64 * 2)
    assert r["tflops"] * 1e12 * r["ms"] * 1e-3 == pytest.approx(6 * 1 * 2 * 128 * 64)
    assert {r["part"] for r in res} == {"forward", "gating", "experts"}
    assert "| model |" in md.read_text()
    if png is not None:
        assert png.stat().st_size > 1000


def test_bench_usage_errors(capsys):
    assert main(["bench", "--models", "gpt5", "--no-progress"]) == 2
    assert main(["bench", "--quick", "--parts", "softmax", "--no-progress"]) == 2
    assert main(["bench", "--quick", "--backend", "nope", "--no-progress"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_model_shapes_and_caps():
    ds = MODELS["deepseek-v3"]
    assert ds.weight_bytes(torch.bfloat16) == 256 * 3 * 7168 * 2048 * 2  # ~22.5 GB
    mix = MODELS["mixtral-8x7b"]
    # SPEC anchor: Mixtral T=1 roofline at 3.35 TB/s is 0.21 ms (2 experts' weights)
    assert mix.weight_bytes(torch.bfloat16, 2) / 3.35e12 * 1e3 == pytest.approx(0.21, abs=0.005)
    capped = ds.capped(100)
    assert capped.E == 96 and capped.E % 8 == 0
    per = capped.E // 8
    assert capped.routing["num_limited_groups"] * per >= capped.K
    assert "96 of 256" in capped.note
    assert fit_to_memory(ds, torch.bfloat16, torch.device("cpu"), 0) is ds


def test_datasheet_and_summary():
    assert datasheet_for("NVIDIA H100 80GB HBM3")["bandwidth_tbs"] == 3.35
    assert datasheet_for("NVIDIA H100 PCIe")["bandwidth_tbs"] == 2.0
    assert datasheet_for("NVIDIA H200")["bandwidth_tbs"] == 4.8
    assert datasheet_for("Some Other GPU") is None
    res = []
    for T, (b, g) in {1: (1.0, 2.0), 16: (2.0, 1.5), 64: (4.0, 5.0)}.items():
        res.append({"model": "m", "experts": 8, "T": T, "part": "forward", "path": "triton", "mode": "graph",
                    "ms": b, "roofline_ms": 0.5, "roofline_frac": 0.5 / b, "served_by": "kernel"})
        res.append({"model": "m", "experts": 8, "T": T, "part": "forward", "path": "triton", "mode": "eager",
                    "ms": b * 3, "roofline_ms": 0.5, "roofline_frac": 0.5 / b / 3, "served_by": "kernel"})
        res.append({"model": "m", "experts": 8, "T": T, "part": "forward", "path": "grouped_mm", "mode": "graph",
                    "ms": g, "roofline_ms": 0.5, "roofline_frac": 0.5 / g, "served_by": "reference"})
    s = spec_summary(res, "triton", 256)
    assert s["points"] == 3 and s["median_roofline_frac"] == pytest.approx(0.25)
    assert s["min_roofline_frac"] == pytest.approx(0.125) and s["faster_than_grouped_mm"] == "2/3"


def test_host_timer_counts_iterations():
    calls = []
    t = Timer(torch.device("cpu"), warmup=2, min_iters=5, max_iters=7, min_time_s=0.0)(lambda: calls.append(1))
    assert t.iters == 5 and len(calls) == 7 and t.ms >= 0
