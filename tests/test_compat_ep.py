"""The original's expert parallelism (ep_size / ep_rank / ep_group / dp_input) through the compatibility
classes, over gloo with 2 and 3 processes: every rank's output equals the EP=1 layer on the same tokens.

This file is also the worker: ``python tests/test_compat_ep.py RANK WORLD INIT_FILE OUT_DIR`` runs every
scenario on one rank and writes ``OUT_DIR/rank<R>.json`` as ``{scenario: "ok" | failure}``.
"""
from __future__ import annotations

import datetime
import json
import sys
import traceback
from pathlib import Path

import pytest
import torch

TIMEOUT_S = 90


# --------------------------------------------------------------------------- the worker

def _state(E, H, I, seed, quant):
    """A full state dict in the original's layout, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    state = {"gating.gate_weight": torch.randn(H, E, generator=g) * 0.5}
    if not quant:
        state["experts.up_proj_weight"] = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
        state["experts.down_proj_weight"] = torch.randn(E, H, I, generator=g) * I ** -0.5
        return state
    for which, n, k in (("up", 2 * I, H), ("down", H, I)):
        w = torch.randn(E, n, k, generator=g) * k ** -0.5
        s = (w.abs().amax(-1) / 127).clamp(min=1e-12).bfloat16()
        state[f"experts.{which}_proj_weight"] = torch.round(w / s.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        state[f"experts.{which}_proj_weight_scale"] = s
        state[f"experts.{which}_proj_quantize.inv_smooth_scale"] = torch.rand(E, k, generator=g) + 0.5
    return state


def _local(state, lo, hi):
    return {k: (v[lo:hi] if k.startswith("experts.") else v) for k, v in state.items()}


def _scenario(rank, world, *, quant, dp_input, T, forced, seed):
    import mojo_opset as mo

    E, K, H, I = 7, 2, 16, 8                          # 7 experts: uneven slices over 2 and 3 ranks
    cls = mo.MojoQuantMoE if quant else mo.MojoMoE
    state = _state(E, H, I, seed, quant)
    full = cls(E, K, H, I)
    full.load_state_dict(state)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, H, generator=g)
    ids = None
    if forced:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        ids[::3, 0] = -1                              # partial replay: -1 keeps the natural choice
    y_full = full(x, forced_expert_ids=ids)
    ids_full = full.last_topk_ids

    ep = cls(E, K, H, I, ep_size=world, ep_rank=rank, ep_group=None, dp_input=dp_input)
    ep.load_state_dict(_local(state, ep.ep_start, ep.ep_end))
    if dp_input:                                      # each rank passes its own (uneven) share
        bounds = [0] + torch.cumsum(torch.tensor([T // world + (r < T % world) for r in range(world)]), 0).tolist()
        lo, hi = bounds[rank], bounds[rank + 1]
        y = ep(x[lo:hi], forced_expert_ids=None if ids is None else ids[lo:hi])
        want, want_ids = y_full[lo:hi], ids_full[lo:hi]
    else:                                             # every rank passes all tokens
        y = ep(x, forced_expert_ids=ids)
        want, want_ids = y_full, ids_full
    problems = []
    if not torch.equal(ep.last_topk_ids, want_ids):
        problems.append("routing differs from EP=1")
    if y.shape != want.shape or not torch.allclose(y, want, atol=1e-5, rtol=1e-5):
        problems.append(f"output differs from EP=1: max abs {float((y - want).abs().max()):.3g}")
    return problems


def _bad_group_size(rank, world):
    import mojo_opset as mo

    m = mo.MojoMoE(4, 2, 8, 4, ep_size=world + 1, ep_rank=rank)
    try:
        m(torch.randn(3, 8))
    except ValueError as exc:
        return [] if "ep_size" in str(exc) else [f"unclear error: {exc}"]
    return ["a wrong ep_size was accepted"]


SCENARIOS = {
    f"{'quant' if q else 'float'}-{'dp' if dp else 'replicated'}{'-forced' if f else ''}-T{T}":
        dict(quant=q, dp_input=dp, T=T, forced=f, seed=7 * T + 3 * q + dp)
    for q in (False, True) for dp in (False, True) for f in (False, True) for T in (5, 12)
}


def worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    results = {}
    for name, kw in SCENARIOS.items():
        try:
            problems = _scenario(rank, world, **kw)
            results[name] = "; ".join(problems) or "ok"
        except Exception:
            results[name] = traceback.format_exc()
    try:
        results["bad-ep-size"] = "; ".join(_bad_group_size(rank, world)) or "ok"
    except Exception:
        results["bad-ep-size"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


# --------------------------------------------------------------------------- the tests

_cache: dict = {}


def _run(world, tmp_path_factory):
    if world not in _cache:
        from rank_launcher import launch_ranks

        tmp = tmp_path_factory.mktemp(f"compat_ep_{world}")
        try:
            _cache[world] = launch_ranks(lambda r: [__file__, str(r), str(world), str(tmp / "init"), str(tmp)],
                                         world, tmp, 300, "compat EP workers")
        except Exception as exc:
            _cache[world] = exc
    if isinstance(_cache[world], Exception):
        raise _cache[world]
    return _cache[world]


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("scenario", [*SCENARIOS, "bad-ep-size"])
def test_compat_ep_gloo(world, scenario, tmp_path_factory):
    results = _run(world, tmp_path_factory)
    bad = {r: res.get(scenario, "not run") for r, res in enumerate(results)}
    bad = {r: v for r, v in bad.items() if v != "ok"}
    assert not bad, "\n".join(f"rank {r}: {v}" for r, v in bad.items())


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
