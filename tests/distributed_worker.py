"""One rank of the expert-parallel test suites (launched by tests/test_distributed_*.py).

    python tests/distributed_worker.py SUITE RANK WORLD INIT_FILE OUT_DIR

Every scenario builds the whole problem (all ranks' tokens, all experts) from a seed, computes the
EP=1 result on this process, runs the EP call on this rank's shard and compares forward outputs and
gradients.  Results go to OUT_DIR/rank<R>.json as {scenario: "ok" | failure text}.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

import mojo_opset as mo
from mojo_opset.distributed import expert_ranges

TIMEOUT_S = 90          # a collective that waits longer fails instead of hanging the test run
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


# --------------------------------------------------------------------------- problems

def make_problem(seed, *, E, K, H, I, tokens, dtype, device, shared=False, forced=False, bias=False):
    """Every tensor of a problem, identical on all ranks (CPU generator, then moved)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale)  # noqa: E731
    T = sum(tokens)
    p = dict(x=rnd(T, H), gate_weight=rnd(E, H, scale=0.5), w13=rnd(E, 2 * I, H, scale=H ** -0.5),
             w2=rnd(E, H, I, scale=I ** -0.5), cot=rnd(T, H))
    if bias:
        p["gate_bias"] = rnd(E, scale=0.1)
    if shared:
        p.update(shared_w13=rnd(2 * I, H, scale=H ** -0.5), shared_w2=rnd(H, I, scale=I ** -0.5),
                 shared_gate=rnd(1, H, scale=0.5))
    p = {k: v.to(device=device, dtype=dtype) for k, v in p.items()}
    if forced:
        p["forced_expert_ids"] = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(device) \
            if T else torch.zeros(0, K, dtype=torch.int64, device=device)
    return p


_WEIGHTS = ("x", "gate_weight", "gate_bias", "w13", "w2", "shared_w13", "shared_w2", "shared_gate")


def run_case(p, *, K, rank, world, tokens, mode, grad=True, **kw):
    """EP on this rank's shard vs EP=1 on everything; returns a list of mismatch descriptions."""
    E = p["gate_weight"].shape[0]
    lo, hi = expert_ranges(E, world)[rank]
    t0 = sum(tokens[:rank])
    t1 = t0 + tokens[rank]
    args = {k: v for k, v in p.items() if k != "cot"}
    ref = {k: v.detach().clone().requires_grad_(grad and k in _WEIGHTS) for k, v in args.items()}
    y_ref = mo.moe_forward(ref["x"], ref["gate_weight"], ref["w13"], ref["w2"], K,
                           **{k: v for k, v in ref.items() if k not in ("x", "gate_weight", "w13", "w2")}, **kw)
    mine = {k: v.detach().clone() for k, v in args.items()}
    mine["x"] = mine["x"][t0:t1].clone()
    mine["w13"], mine["w2"] = mine["w13"][lo:hi].clone(), mine["w2"][lo:hi].clone()
    if "forced_expert_ids" in mine:
        mine["forced_expert_ids"] = mine["forced_expert_ids"][t0:t1]
    for k, v in mine.items():
        v.requires_grad_(grad and k in _WEIGHTS)
    y = mo.moe_forward(mine["x"], mine["gate_weight"], mine["w13"], mine["w2"], K,
                       **{k: v for k, v in mine.items() if k not in ("x", "gate_weight", "w13", "w2")},
                       ep_group=dist.group.WORLD, ep_mode=mode, **kw)
    bad = []
    _close(bad, "output", y, y_ref[t0:t1])
    if not grad:
        return bad
    (y_ref.float() * p["cot"].float()).sum().backward()
    (y.float() * p["cot"][t0:t1].float()).sum().backward()
    _close(bad, "grad x", _grad(mine["x"]), _grad(ref["x"])[t0:t1])
    _close(bad, "grad w13", _grad(mine["w13"]), _grad(ref["w13"])[lo:hi])
    _close(bad, "grad w2", _grad(mine["w2"]), _grad(ref["w2"])[lo:hi])
    for k in ("gate_weight", "gate_bias", "shared_w13", "shared_w2", "shared_gate"):
        if k in mine:   # replicated: each rank holds its own tokens' share of the gradient
            gsum = _grad(mine[k]).float()
            dist.all_reduce(gsum)
            _close(bad, f"grad {k} (summed over ranks)", gsum.to(mine[k].dtype), _grad(ref[k]))
    return bad


def _grad(t):
    """A parameter's gradient; None (no token reached it) counts as zeros."""
    return torch.zeros_like(t) if t.grad is None else t.grad


def _close(bad, what, got, want):
    atol, rtol = TOL[want.dtype]
    if want.is_cuda:   # GPU kernels may run fp32 GEMMs in TF32, fuse the weighting, tile rows differently
        atol, rtol = (1e-3, 1e-3) if want.dtype == torch.float32 else (5e-2, 5e-2)
    if got is None or got.shape != want.shape:
        bad.append(f"{what}: got {None if got is None else tuple(got.shape)}, want {tuple(want.shape)}")
    elif not torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol):
        err = (got.float() - want.float()).abs().max().item()
        bad.append(f"{what}: max abs error {err:.3g} (atol {atol}, rtol {rtol})")


# --------------------------------------------------------------------------- scenarios

def sc_equal(mode, *, E, K, tokens, dtype=torch.float32, H=16, I=8, seed=0, shared=False, forced=False,
             bias=False, **kw):
    """EP equals EP=1: outputs and gradients (``kw``: grad=, and moe_forward keywords)."""
    def run(ctx):
        p = make_problem(seed, E=E, K=K, H=H, I=I, tokens=tokens, dtype=dtype, device=ctx["device"],
                         shared=shared, forced=forced, bias=bias)
        return run_case(p, K=K, rank=ctx["rank"], world=ctx["world"], tokens=tokens, mode=mode, **kw)
    return run


def sc_replay(mode, *, E=5, K=2, tokens=(4, 3)):
    """Record the routing in one EP call, replay it as forced ids: bit-identical output."""
    def run(ctx):
        p = make_problem(3, E=E, K=K, H=16, I=8, tokens=tokens, dtype=torch.float32, device=ctx["device"])
        r, W = ctx["rank"], ctx["world"]
        lo, hi = expert_ranges(E, W)[r]
        t0 = sum(tokens[:r])
        x = p["x"][t0:t0 + tokens[r]]
        kw = dict(ep_group=dist.group.WORLD, ep_mode=mode)
        y, info = mo.moe_forward(x, p["gate_weight"], p["w13"][lo:hi], p["w2"][lo:hi], K,
                                 return_router_info=True, **kw)
        y2 = mo.moe_forward(x, p["gate_weight"], p["w13"][lo:hi], p["w2"][lo:hi], K,
                            forced_expert_ids=info["topk_ids"], **kw)
        return [] if torch.equal(y, y2) else [f"replayed output differs by {(y - y2).abs().max().item():.3g}"]
    return run


class _CheckedExperts(mo.OpImpl):
    """A vendor-style moe_forward override that insists on local ids and counts its calls."""
    op, supports_autograd, calls = "moe_forward", True, 0

    def forward(self, call):
        from mojo_opset.functional.forward import compose_forward
        ids, E = call.topk_ids, call.w13.shape[0]
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < E):
            raise AssertionError(f"ids {ids.tolist()} outside [0, {E})")
        type(self).calls += 1
        return compose_forward(call, backend="torch")   # the sub-ops on the reference


class _CheckedBackend(mo.Backend):
    name, description = "epcheck", "test backend"

    def load(self):
        return {"moe_forward": _CheckedExperts()}


def sc_backend(mode):
    """The local experts run on the selected backend, with ids local to the rank's slice."""
    def run(ctx):
        mo.register_backend(_CheckedBackend())
        try:
            _CheckedExperts.calls = 0
            bad = sc_equal(mode, E=5, K=2, tokens=[3, 4] + [2] * (ctx["world"] - 2), backend="epcheck")(ctx)
            if _CheckedExperts.calls == 0 or mo.last_served("moe_forward").get("backend") != "epcheck":
                bad.append(f"the epcheck backend did not serve the local experts: {mo.last_served('moe_forward')}")
            return bad
        finally:
            mo.unregister_backend("epcheck")
    return run


def sc_quant(mode, scheme, *, group_size=None, E=5, K=2, tokens=(4, 5), I=8):
    """Quantized EP (each rank holds its slice of one quantization) equals quantized EP=1."""
    def run(ctx):
        r, W = ctx["rank"], ctx["world"]
        p = make_problem(11, E=E, K=K, H=16, I=I, tokens=tokens, dtype=torch.bfloat16, device=ctx["device"],
                         shared=True)
        q = mo.quantize_experts(p["w13"], p["w2"], scheme, group_size)
        lo, hi = expert_ranges(E, W)[r]
        t0 = sum(tokens[:r])
        shared = {k: p[k] for k in ("shared_w13", "shared_w2", "shared_gate")}
        g_ref = p["gate_weight"].clone().requires_grad_()
        y_ref = mo.quant_moe_forward(p["x"], g_ref, q, K, **shared)
        g = p["gate_weight"].clone().requires_grad_()
        y = mo.quant_moe_forward(p["x"][t0:t0 + tokens[r]], g, q.slice_experts(lo, hi), K, **shared,
                                 ep_group=dist.group.WORLD, ep_mode=mode)
        bad = []
        _close(bad, "output", y, y_ref[t0:t0 + tokens[r]])
        (y_ref.float() * p["cot"].float()).sum().backward()
        (y.float() * p["cot"][t0:t0 + tokens[r]].float()).sum().backward()
        gsum = g.grad.float()
        dist.all_reduce(gsum)
        _close(bad, "grad gate_weight (summed over ranks)", gsum.to(g.dtype), g_ref.grad)
        return bad
    return run


def sc_mismatch(ctx):
    """A configuration differing between ranks: every rank raises a clear error, no hang."""
    r, W, dev = ctx["rank"], ctx["world"], ctx["device"]
    bad = []

    def attempt(what, expect, *, E=4, K=2, H=16, dtype=torch.float32, mode="allgather", slice_off=0):
        p = make_problem(7, E=E, K=K, H=H, I=8, tokens=[3] * W, dtype=dtype, device=dev)
        lo, hi = expert_ranges(E, W)[r]
        try:
            mo.moe_forward(p["x"][:3], p["gate_weight"], p["w13"][lo:hi + slice_off], p["w2"][lo:hi + slice_off],
                           K, ep_group=dist.group.WORLD, ep_mode=mode)
        except ValueError as exc:
            if expect not in str(exc):
                bad.append(f"{what}: error {str(exc)!r} does not mention {expect!r}")
        else:
            bad.append(f"{what}: no error")

    last = r == W - 1
    attempt("top_k", "disagree on top_k", K=3 if last else 2)
    attempt("ep_mode", "disagree on ep_mode", mode="alltoall" if last else "allgather")
    attempt("dtype", "disagree on x dtype", dtype=torch.bfloat16 if last else torch.float32)
    attempt("hidden size", "disagree on hidden size", H=8 if last else 16)
    attempt("experts", "disagree on num_experts", E=6 if last else 4)
    attempt("slice", "w13 must have" if r == 0 else "rejected their arguments", slice_off=-1 if r == 0 else 0)
    # the group is still in step afterwards
    bad += sc_equal("alltoall", E=4, K=2, tokens=[2] * W, grad=False)(ctx)
    return bad


def _suite(world):
    t = [5, 7, 0, 3][:world]                       # a rank with zero tokens on 4 ranks
    cases = {}
    for m in ("allgather", "alltoall"):
        if world == 2:
            cases[f"{m}-basic"] = sc_equal(m, E=4, K=2, tokens=[5, 7])
            cases[f"{m}-uneven-E5"] = sc_equal(m, E=5, K=2, tokens=[6, 3], bias=True)
            cases[f"{m}-zero-tokens"] = sc_equal(m, E=4, K=2, tokens=[0, 6])
            cases[f"{m}-forced"] = sc_equal(m, E=5, K=3, tokens=[4, 5], forced=True)
            cases[f"{m}-shared"] = sc_equal(m, E=4, K=2, tokens=[3, 5], shared=True)
            cases[f"{m}-bf16"] = sc_equal(m, E=5, K=2, tokens=[6, 4], dtype=torch.bfloat16, shared=True)
            cases[f"{m}-all-empty"] = sc_equal(m, E=4, K=2, tokens=[0, 0])
            cases[f"{m}-no-grad"] = sc_equal(m, E=5, K=2, tokens=[3, 4], grad=False)
            cases[f"{m}-replay"] = sc_replay(m)
            cases[f"{m}-backend"] = sc_backend(m)
            cases[f"{m}-quant-w8a8_int8"] = sc_quant(m, "w8a8_int8")
            cases[f"{m}-quant-w4a16_int4"] = sc_quant(m, "w4a16_int4", group_size=8, tokens=(0, 5))
        else:
            cases[f"{m}-uneven-E6"] = sc_equal(m, E=6, K=3, tokens=t, shared=True)
            cases[f"{m}-forced-E6"] = sc_equal(m, E=6, K=2, tokens=t, forced=True)
            cases[f"{m}-fewer-experts-than-ranks"] = sc_equal(m, E=3, K=2, tokens=t)
            cases[f"{m}-quant-w8a16_int8"] = sc_quant(m, "w8a16_int8", E=6, tokens=t)
    cases["mismatch"] = sc_mismatch
    return cases


def _gpu_suite(world):
    cases = {}
    for m in ("allgather", "alltoall"):
        for dt in (torch.bfloat16, torch.float32):
            name = str(dt).replace("torch.", "")
            cases[f"{m}-{name}"] = sc_equal(m, E=6, K=2, tokens=[37, 0] + [5] * (world - 2), H=64, I=32,
                                            dtype=dt, shared=True)
        cases[f"{m}-forced"] = sc_equal(m, E=5, K=3, tokens=[9, 4] + [5] * (world - 2), H=64, I=32,
                                        dtype=torch.bfloat16, forced=True)
    cases["mismatch"] = sc_mismatch
    return cases


SUITES = {"gloo": _suite, "nccl": _gpu_suite}


def scenario_names(suite: str, world: int) -> list[str]:
    return list(SUITES[suite](world))


def main(suite, rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    backend = "nccl" if suite == "nccl" else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    ctx = dict(rank=rank, world=world, device=device)
    results = {}
    for name, fn in SUITES[suite](world).items():
        try:
            bad = fn(ctx)
            results[name] = "ok" if not bad else "; ".join(bad)
        except Exception:
            results[name] = traceback.format_exc()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
