"""``mojo-opset bench --against``: peer adapters are checked against the reference before they are
timed, skipped with the reason when absent or wrong; the table's ``vs best peer`` column."""
import sys
import types

import pytest
import torch

from mojo_opset.functional.forward import routed_experts
from mojo_opset.tools import bench_against
from mojo_opset.tools.bench_models import MODELS, make_tokens, make_weights


@pytest.fixture
def fake_flag_gems(monkeypatch):
    """A stand-in ``flag_gems`` whose fused experts are the reference (what the adapter must call)."""
    mod = types.ModuleType("flag_gems")
    seen = []

    def fused_experts_impl(hidden_states, w1, w2, topk_weights, topk_ids, **kw):
        seen.append((w1.shape, topk_ids.dtype, topk_weights.dtype))
        return routed_experts(hidden_states, topk_ids, topk_weights, (w1, w2), backend="torch")

    mod.fused_experts_impl = fused_experts_impl
    mod.seen = seen
    monkeypatch.setitem(sys.modules, "flag_gems", mod)
    return mod


def _point(T=3):
    model = MODELS["tiny"]
    w = make_weights(model, torch.float32, torch.device("cpu"))
    return model, w, make_tokens(model, T, torch.float32, torch.device("cpu"))


def test_names_and_aliases():
    assert [p.name for p in bench_against.resolve("flag-gems,transformers")] == ["flaggems", "hf"]
    assert len(bench_against.resolve("all")) == len(bench_against.PEERS)
    with pytest.raises(ValueError, match="unknown library 'deepspeed'"):
        bench_against.resolve("deepspeed")


def test_an_absent_library_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)        # import fails as when not installed
    reason = bench_against.available(bench_against.PEERS["vllm"])
    assert reason and "vllm is not importable" in reason


def test_a_correct_peer_is_timed_and_compared(fake_flag_gems):
    model, w, x = _point()
    peer = bench_against.PEERS["flaggems"]
    assert bench_against.available(peer) is None
    paths, skipped = bench_against.point_paths([peer], "torch", x, w, model.K, "float32")
    assert set(paths) == {"torch", "flaggems"} and not skipped
    y = paths["flaggems"][0]()
    assert y.shape == x.shape and fake_flag_gems.seen[-1][1:] == (torch.int32, torch.float32)
    results = [{"model": "tiny", "experts": 8, "T": 3, "part": bench_against.PART, "path": p, "mode": "eager",
                "ms": ms} for p, ms in (("torch", 2.0), ("flaggems", 3.0))]
    text = bench_against.render_peers(results, "torch")
    assert "flaggems" in text and "1.50x" in text and "at least as fast at 1/1 points" in text


def test_a_wrong_peer_is_not_timed(fake_flag_gems):
    fake_flag_gems.fused_experts_impl = lambda x, w1, w2, tw, ti, **kw: torch.zeros_like(x)
    model, w, x = _point()
    paths, skipped = bench_against.point_paths([bench_against.PEERS["flaggems"]], "torch", x, w, model.K, "float32")
    assert "flaggems" not in paths and "wrong result" in skipped["flaggems"]


def test_a_failing_entry_point_is_skipped(fake_flag_gems):
    def broken(*a, **k):
        raise TypeError("fused_experts_impl() got an unexpected keyword")

    fake_flag_gems.fused_experts_impl = broken
    model, w, x = _point()
    _, skipped = bench_against.point_paths([bench_against.PEERS["flaggems"]], "torch", x, w, model.K, "float32")
    assert skipped["flaggems"].startswith("TypeError")


def test_bench_cli_reports_skipped_peers(capsys, monkeypatch):
    from mojo_opset.tools.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)
    rc = main(["bench", "--quick", "--backend", "torch", "--models", "tiny", "--tokens", "1", "--parts", "none",
               "--paths", "backend", "--against", "vllm", "--no-progress", "--no-host-time"])
    out = capsys.readouterr().out
    assert rc == 0 and "--against vllm: skipped" in out
