"""quant_moe_forward with expert parallelism (gloo, 2 processes) equals EP=1, for every scheme and
both exchange modes, with shared experts and forced ids.

Run as a script, this file is one rank:  python tests/test_quant_ep.py RANK WORLD INIT_FILE OUT_DIR
"""
from __future__ import annotations

import datetime
import json
import sys
import traceback
from pathlib import Path

import pytest
import torch

SCHEMES = ("w8a8_int8", "w4a8_int4", "w8a16_int8", "w4a16_int4", "w8a8_fp8_block")
MODES = ("allgather", "alltoall")
TOKENS = (5, 7)
E, K, H, I = 5, 2, 256, 128          # 5 experts on 2 ranks: an uneven split (3 + 2)


def _problem():
    import mojo_opset as mo

    g = torch.Generator().manual_seed(11)
    T = sum(TOKENS)
    x = torch.randn(T, H, generator=g)
    gw = torch.randn(E, H, generator=g) * H ** -0.5
    w13 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    shared = dict(shared_w13=torch.randn(64, H, generator=g) * H ** -0.5,
                  shared_w2=torch.randn(H, 32, generator=g) * 32 ** -0.5)
    forced = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return mo, x, gw, w13, w2, shared, forced


def _scenarios(rank, world):
    import torch.distributed as dist
    from mojo_opset.distributed import expert_ranges

    mo, x, gw, w13, w2, shared, forced = _problem()
    lo, hi = expert_ranges(E, world)[rank]
    t0 = sum(TOKENS[:rank])
    t1 = t0 + TOKENS[rank]
    results = {}
    for scheme in SCHEMES:
        q = mo.quantize_experts(w13, w2, scheme)
        local = q.slice_experts(lo, hi)
        for mode in MODES:
            for variant, kw in (("plain", {}), ("shared+forced", dict(shared, forced_expert_ids=forced))):
                name = f"{scheme}-{mode}-{variant}"
                try:
                    want = mo.quant_moe_forward(x, gw, q, K, **kw)[t0:t1]
                    kw_local = dict(kw)
                    if "forced_expert_ids" in kw_local:
                        kw_local["forced_expert_ids"] = forced[t0:t1]
                    got = mo.quant_moe_forward(x[t0:t1], gw, local, K, ep_group=dist.group.WORLD, ep_mode=mode,
                                               **kw_local)
                    err = (got - want).abs().max().item()
                    # the same tokens through the same experts; only the combine's order differs
                    ok = got.shape == want.shape and err <= 1e-5 * want.abs().max().item()
                    results[name] = "ok" if ok else f"max abs error {err:.3g}"
                except Exception:
                    results[name] = traceback.format_exc()[-2000:]
    # a rank whose slice does not match its share of the experts: every rank raises, none hangs
    try:
        mo.quant_moe_forward(x[t0:t1], gw, q.slice_experts(0, 1) if rank == 0 else q.slice_experts(lo, hi), K,
                             ep_group=dist.group.WORLD)
        results["bad-slice"] = "no error"
    except ValueError as exc:
        want = "q must hold" if rank == 0 else "rejected their arguments"
        results["bad-slice"] = "ok" if want in str(exc) else f"unexpected error: {exc}"
    return results


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    try:
        results = _scenarios(rank, world)
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


SCENARIOS = [f"{s}-{m}-{v}" for s in SCHEMES for m in MODES for v in ("plain", "shared+forced")] + ["bad-slice"]
_cache: dict = {}


def _launch(tmp: Path, world=2):
    from rank_launcher import launch_ranks

    return launch_ranks(lambda r: [__file__, str(r), str(world), str(tmp / "init"), str(tmp)], world, tmp, 300,
                        "quantized EP workers")


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_quant_ep_gloo(scenario, tmp_path_factory):
    pytest.importorskip("mojo_opset.distributed")
    if "results" not in _cache:
        try:
            _cache["results"] = _launch(tmp_path_factory.mktemp("quant_ep"))
        except Exception as exc:
            _cache["results"] = exc
    if isinstance(_cache["results"], Exception):
        raise _cache["results"]
    bad = {r: res.get(scenario, "not run") for r, res in enumerate(_cache["results"])}
    bad = {r: v for r, v in bad.items() if v != "ok"}
    assert not bad, "\n".join(f"rank {r}: {v}" for r, v in bad.items())


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
