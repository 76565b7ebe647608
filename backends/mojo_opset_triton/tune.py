"""Tune the fused-experts tile configs on this GPU and time them against the grouped_mm path.

    python -m mojo_opset_triton.tune                 # tune, write configs/<gpu>.json, print the table
    python -m mojo_opset_triton.tune --no-tune       # time the current configs only
    python -m mojo_opset_triton.tune --shapes qwen3 --tokens 1 64 --json out.json

For each model shape and token count it times the routed-expert forward (given routed ids) of
(a) the ``torch._grouped_mm`` path (the core's routed experts with the torch backend) and (b) the
fused Triton kernels, T <= 256 replayed from a CUDA graph, and reports the roofline max(active
expert bytes / copy bandwidth, FLOPs / bf16 matmul peak), both peaks measured at the start of the
run.  The model shapes, timers and peaks are those of ``mojo-opset bench``, so a tuned point and a
benchmarked one are measured alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import triton

from mojo_opset.tools.bench_models import DEFAULT_MODELS, ModelShape, resolve
from mojo_opset.tools.bench_timing import Timer, capture_graph, measure_peaks

from .configs import CONFIG_DIR, gemv_heuristic, gpu_file_name, heuristic, shape_key
from .forward import fused_moe_forward

TOKENS = (1, 16, 64, 256, 2048, 8192)
GRAPH_MAX_T = 256
DEVICE = torch.device("cuda")


def make_timer(device=DEVICE) -> Timer:
    """bench's timer (CUDA events, L2 flushed between iterations), shorter per measurement: a
    search times dozens of tile configs per point."""
    return Timer(device, warmup=2, min_iters=10, max_iters=100, min_time_s=0.1)


def time_ms(timer: Timer, fn, T: int) -> float:
    """Median ms of ``fn``; T <= GRAPH_MAX_T replayed from a CUDA graph, as decode steps run."""
    if T > GRAPH_MAX_T:
        return timer(fn).ms
    graph = capture_graph(fn, timer.device)
    try:
        return timer(graph.replay).ms
    finally:
        del graph


def make_case(model: ModelShape, T: int, device=DEVICE, seed: int = 0):
    """bf16 tokens and the reference routing of random logits with the model's options."""
    from mojo_opset.reference.gating import gating_reference

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, model.H, device=device, dtype=torch.bfloat16, generator=g)
    logits = torch.randn(T, model.E, device=device, generator=g)
    opts = dict(model.routing)
    bias = torch.randn(model.E, device=device, generator=g) * 0.01 if opts.pop("expert_bias", False) else None
    ids, w, _ = gating_reference(logits, model.K, expert_bias=bias, **opts)
    return x, ids, w


def roofline_ms(model: ModelShape, ids, bw_tbs: float, tflops: float) -> float:
    """max(active expert weight bytes / bandwidth, FLOPs / bf16 peak), as bench computes it."""
    active = int(torch.unique(ids).numel())
    return max(model.weight_bytes(torch.bfloat16, active) / (bw_tbs * 1e12),
               model.flops(ids.shape[0]) / (tflops * 1e12)) * 1e3


def candidates(T, E, K, H, I):
    """BLOCK_M values and (BLOCK_N, BLOCK_K, warps, stages) per GEMM worth trying at this size."""
    m = T * K / max(1, min(E, T * K))
    if m <= 8:
        bms = [16]
    elif m <= 24:
        bms = [16, 32, 64]
    elif m <= 96:
        bms = [32, 64, 128]
    else:
        bms = [64, 128]
    small = [(32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 5), (128, 64, 4, 4), (32, 256, 4, 3),
             (64, 256, 4, 3), (128, 128, 4, 3)]
    large = [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 4), (128, 64, 8, 3), (64, 128, 4, 3),
             (128, 128, 8, 3), (256, 64, 8, 3)]
    return bms, small, large


def _cfg(bm, up, down):
    def d(t):
        bn, bk, w, s = t
        return {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8 if bm >= 64 else 1, "num_warps": w, "num_stages": s}
    return {"BLOCK_M": bm, "up": d(up), "down": d(down)}


def gemv_candidates(top_k: int):
    """(BLOCK_N, BLOCK_K, warps) of the one-token kernels, up then down, each with at most 128 fp32
    partial sums per thread (two accumulators up, one per slot down)."""
    slots = triton.next_power_of_2(top_k)
    up = [(bn, bk, w) for bn in (2, 4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8)
          if 2 * bn * bk <= 128 * 32 * w]
    down = [(bn, bk, w) for bn in (1, 2, 4, 8, 16) for bk in (64, 128, 256, 512) for w in (2, 4, 8)
            if 32 * w <= slots * bn * bk <= 128 * 32 * w]
    return up, down


def tune_gemv(timer, model, tiled, x, ids, w, w13, w2, log=None):
    """The one-token kernels' tiles (``tiled`` + ``gemv``): up then down, tiles first, then pipeline
    depths, then the weight loads' eviction policy (on an H200, ``evict_first`` on the gate/up rows
    took 2.5 us off Qwen3-30B-A3B's one-token forward and added 4-7 us at the larger models);
    ``gemv`` None when the tiled row blocks stay faster.  ``log(which, tile, ms)`` sees every timing."""
    base = {k: v for k, v in tiled.items() if k != "gemv"}
    t_tiled = _try(timer, lambda: fused_moe_forward(x, ids, w, w13, w2, base), 1)
    if log:
        log("tiled", None, t_tiled)
    up_c, down_c = gemv_candidates(model.K)
    best = gemv_heuristic(model.H, model.I, model.K, torch.bfloat16)
    t_best = float("inf")
    for which, cands in (("up", up_c), ("down", down_c)):
        passes = (lambda b: [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": nw, "num_stages": 1} for n, k, nw in cands],
                  lambda b: [dict(b, num_stages=st) for st in (2, 3)],
                  lambda b: [dict(b, evict=ev) for ev in ("evict_first", "evict_last")])
        for tiles_of in passes:
            for c in tiles_of(best[which]):
                trial = dict(best, **{which: c})
                t = _try(timer, lambda: fused_moe_forward(x, ids, w, w13, w2, dict(base, gemv=trial)), 1)
                if log:
                    log(which, c, t)
                if t < t_best:
                    t_best, best = t, trial
    if t_best < t_tiled:
        return dict(base, gemv=best), t_best
    return dict(base, gemv=None), t_tiled


def _try(timer, fn, T):
    try:
        return time_ms(timer, fn, T)
    except Exception as exc:  # out of shared memory / registers for this tile: skip it
        if "OutOfResources" not in type(exc).__name__ and "out of resource" not in str(exc).lower():
            print(f"    config failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        torch.cuda.synchronize()
        return float("inf")


def tune_point(timer, model, T, x, ids, w, w13, w2):
    H, I, E, K = model.H, model.I, model.E, model.K
    base = heuristic(T, E, H, I, K, torch.bfloat16)
    bms, small, large = candidates(T, E, K, H, I)
    best_t, best = float("inf"), base
    for bm in bms:
        cands = small if bm <= 32 else large
        # two accumulators in the up GEMM: no 128x256 tiles there
        up_cands = [c for c in cands if bm < 128 or c[0] <= 128]
        tup = lambda c: (c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"])  # noqa: E731
        h = heuristic(T, E, H, I, K, torch.bfloat16)
        up_best, down_fixed = None, tup(h["down"])
        t_up = float("inf")
        for c in up_cands:
            t = _try(timer, lambda: fused_moe_forward(x, ids, w, w13, w2, _cfg(bm, c, down_fixed)), T)
            if t < t_up:
                t_up, up_best = t, c
        if up_best is None:
            continue
        t_dn, dn_best = float("inf"), None
        for c in cands:
            t = _try(timer, lambda: fused_moe_forward(x, ids, w, w13, w2, _cfg(bm, up_best, c)), T)
            if t < t_dn:
                t_dn, dn_best = t, c
        if dn_best is not None and t_dn < best_t:
            best_t, best = t_dn, _cfg(bm, up_best, dn_best)
    return best, best_t


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mojo_opset_triton.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL",
                    help="bench's model shapes: mixtral, qwen3, deepseek or their full names (default: all three)")
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS), metavar="T",
                    help=f"token counts (default: {' '.join(map(str, TOKENS))})")
    ap.add_argument("--no-tune", action="store_true", help="time the current configs, do not search")
    ap.add_argument("--config-out", default=None, help="where to write the tuned JSON "
                    "(default: configs/<gpu>.json in the package, merged with what is there)")
    ap.add_argument("--json", default=None, help="write the timing table as JSON here")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tuning needs a CUDA GPU")
    try:
        models = resolve(args.shapes)
    except ValueError as exc:
        raise SystemExit(str(exc).replace("--models", "--shapes"))
    from mojo_opset.functional.forward import routed_experts

    from . import configs as cfgmod

    dev_name = torch.cuda.get_device_name()
    timer = make_timer()
    peaks = measure_peaks(DEVICE, timer, quick=False)["measured"]
    bw, peak = peaks["bandwidth_tbs"], peaks["bf16_tflops"]
    print(f"device {dev_name}; copy bandwidth {bw:.2f} TB/s; bf16 matmul {peak:.0f} TFLOP/s", flush=True)
    out_path = args.config_out or os.path.join(CONFIG_DIR, gpu_file_name(dev_name))
    try:
        with open(out_path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table.update({"device": dev_name, "torch": torch.__version__})
    table["triton"] = triton.__version__
    table.setdefault("configs", {})
    rows = []
    for model in models:
        name, H, I, E, K = model.name, model.H, model.I, model.E, model.K
        g = torch.Generator(device="cuda").manual_seed(1)
        w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        key = shape_key(torch.bfloat16, E, H, I, K)
        for T in args.tokens:
            x, ids, w = make_case(model, T)
            roof = roofline_ms(model, ids, bw, peak)
            t_ref = time_ms(timer, lambda: routed_experts(x, ids, w, (w13, w2), backend="torch"), T)
            if args.no_tune:
                cfg = None
                t_tri = time_ms(timer, lambda: fused_moe_forward(x, ids, w, w13, w2), T)
            else:
                t0 = time.time()
                cfg, t_tri = tune_point(timer, model, T, x, ids, w, w13, w2)
                if T == 1:
                    cfg, t_tri = tune_gemv(timer, model, cfg, x, ids, w, w13, w2)
                table["configs"].setdefault(key, {})[str(T)] = cfg
                print(f"  tuned {name} T={T} in {time.time() - t0:.0f}s: {json.dumps(cfg)}", flush=True)
            y = fused_moe_forward(x, ids, w, w13, w2, cfg)
            ref = routed_experts(x, ids, w, (w13, w2), backend="torch")
            err = float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
            row = dict(shape=name, T=T, grouped_mm_ms=t_ref, triton_ms=t_tri, roofline_ms=roof,
                       speedup=t_ref / t_tri, roofline_frac=roof / t_tri, rel_err=err)
            rows.append(row)
            print(f"{name:13s} T={T:5d}  grouped_mm {t_ref:8.3f} ms  triton {t_tri:8.3f} ms  roofline {roof:7.3f} ms"
                  f"  x{t_ref / t_tri:5.2f}  {roof / t_tri:5.2f} of roofline  err {err:.1e}", flush=True)
            del x, ids, w, y, ref
        if not args.no_tune:
            with open(out_path, "w") as f:
                json.dump(table, f, indent=1, sort_keys=True)
            cfgmod.clear_cache()
        del w13, w2
        torch.cuda.empty_cache()
    fracs = [r["roofline_frac"] for r in rows]
    print("\n| shape | T | grouped_mm ms | triton ms | roofline ms | speedup | of roofline |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['T']} | {r['grouped_mm_ms']:.3f} | {r['triton_ms']:.3f} | {r['roofline_ms']:.3f} "
              f"| {r['speedup']:.2f} | {r['roofline_frac']:.2f} |")
    if fracs:
        print(f"\nmedian fraction of roofline {statistics.median(fracs):.2f}; min {min(fracs):.2f}; "
              f"slower than grouped_mm at {sum(r['speedup'] < 1 for r in rows)} of {len(rows)} points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev_name, torch=torch.__version__, triton=triton.__version__,
                           copy_bandwidth_tbs=bw, bf16_peak_tflops=peak, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
