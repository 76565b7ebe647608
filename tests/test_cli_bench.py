"""mojo-opset bench on the CPU (tiny shapes), and its roofline arithmetic."""
import json

import pytest
import torch

from mojo_opset.tools.bench_report import spec_summary
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
    too_wide = [ln for ln in out.splitlines() if len(ln) > 100]
    assert not too_wide, too_wide[:3]
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
        assert r["replayed"] is False   # nor the library's replay of repeated calls
    # tiny: H128 I64 K2; T=1 touches exactly its 2 experts
    r = next(r for r in fwd if r["model"] == "tiny" and r["T"] == 1 and r["path"] == "loop")
    assert r["gbs"] * 1e9 * r["ms"] * 1e-3 == pytest.approx(2 * 3 * 128 * 64 * 2)
    assert r["tflops"] * 1e12 * r["ms"] * 1e-3 == pytest.approx(6 * 1 * 2 * 128 * 64)
    assert {r["part"] for r in res} == {"forward", "gating", "experts", "deterministic"}
    assert data["deterministic_cost"]["median"] > 0
    assert "| model |" in md.read_text()
    if png is not None:
        assert png.stat().st_size > 1000


def test_bench_usage_errors(capsys):
    assert main(["bench", "--models", "gpt5", "--no-progress"]) == 2
    assert main(["bench", "--quick", "--parts", "softmax", "--no-progress"]) == 2
    assert main(["bench", "--quick", "--backend", "nope", "--no-progress"]) == 2
    assert "unknown model" in capsys.readouterr().err
    for argv, hint in ((["--backend", "tritn"], "'triton'"), (["--models", "mixtrl"], "'mixtral'"),
                       (["--parts", "gatng"], "'gating'"), (["--paths", "grouped-mm"], "'grouped_mm'"),
                       (["--dtype", "bf61"], "'bf16'")):
        assert main(["bench", "--quick", "--no-progress", *argv]) == 2
        err = capsys.readouterr().err
        assert f"did you mean {hint}?" in err, err
        assert max(map(len, err.splitlines())) <= 100


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


def test_plot_without_matplotlib_fails_before_measuring(monkeypatch, capsys, tmp_path):
    import sys

    import mojo_opset.tools.bench_timing as timing

    monkeypatch.setitem(sys.modules, "matplotlib", None)          # as if not installed

    def measured(*a, **k):
        raise AssertionError("measured before checking for matplotlib")
    monkeypatch.setattr(timing, "measure_peaks", measured)
    assert main(["bench", "--quick", "--no-progress", "--plot", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "mojo-opset[bench]" in err


def test_every_option_has_help():
    """`--help` explains every option of every subcommand (and of the tile tuner)."""
    import argparse

    from mojo_opset.tools.cli import build_parser

    parsers = []
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.items())
    try:
        from mojo_opset_triton.tune import build_parser as tune_parser
        parsers.append(("tune", tune_parser()))
    except ImportError:  # triton not installed
        pass
    assert {"info", "compare", "bench"} <= {n for n, _ in parsers}
    missing = [f"{name} {a.option_strings[0]}" for name, p in parsers for a in p._actions
               if a.option_strings and a.help in (None, "") and a.help != argparse.SUPPRESS]
    assert not missing, missing


def test_triton_on_cpu_runs_interpreted_like_compare():
    """`bench --backend triton` on a CPU-only machine turns the interpreter on by itself (before
    triton is imported) instead of refusing; a fresh process, since this one has it on already."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernels run compiled")
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = [sys.executable, "-m", "mojo_opset.cli", "bench", "--backend", "triton", "--models", "tiny",
            "--tokens", "1", "--parts", "none", "--paths", "backend", "--no-progress", "--min-time", "0",
            "--no-deterministic"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Triton interpreter" in proc.stdout
    assert "1 measurements" in proc.stdout and "error" not in proc.stdout.lower()


def test_one_model_table_for_bench_compare_and_tune():
    from mojo_opset.tools.bench_models import DEFAULT_MODELS
    from mojo_opset.tools.compare_cases import default_matrix

    model_cases = [c for c in default_matrix("cuda", [torch.bfloat16]) if "model" in c.options]
    for c in model_cases:
        m = MODELS[c.options["model"].split(" ")[0]]
        assert (c.shape["H"], c.shape["K"]) == (m.H, m.K)
        assert {k: v for k, v in c.options.items() if k != "model"} == \
            (m.capped(c.shape["E"]).routing if c.shape["E"] < m.E else m.routing)
    assert {c.options["model"].split(" ")[0] for c in model_cases} == set(DEFAULT_MODELS)
    tune = pytest.importorskip("mojo_opset_triton.tune")
    assert tune.build_parser().parse_args([]).shapes == list(DEFAULT_MODELS)


def test_tune_times_with_the_bench_timers():
    tune = pytest.importorskip("mojo_opset_triton.tune")
    import mojo_opset.tools.bench_timing as timing

    assert tune.measure_peaks is timing.measure_peaks and tune.capture_graph is timing.capture_graph
    timer = tune.make_timer(torch.device("cpu"))
    assert isinstance(timer, Timer)
    calls = []
    ms = tune.time_ms(timer, lambda: calls.append(1), tune.GRAPH_MAX_T + 1)   # eager above the graph sizes
    assert ms >= 0 and len(calls) >= timer.warmup + timer.min_iters
    x, ids, w = tune.make_case(MODELS["tiny-grouped"], 5, device="cpu")
    assert x.shape == (5, 128) and ids.shape == w.shape == (5, 4)
    # the roofline is bench's: max(active expert bytes / bandwidth, FLOPs / peak)
    m = MODELS["tiny-grouped"]
    active = int(torch.unique(ids).numel())
    want = max(m.weight_bytes(torch.bfloat16, active) / 2e12, m.flops(5) / 3e12) * 1e3
    assert tune.roofline_ms(m, ids, 2.0, 3.0) == pytest.approx(want)


def test_misspelled_mojo_backend_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("MOJO_BACKEND", "tritn")
    assert main(["bench", "--quick", "--no-progress", "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'triton'?" in err and "Traceback" not in err
