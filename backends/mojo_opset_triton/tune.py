"""Tune the fused-experts tile configs on this GPU and time them against the grouped_mm path.

    python -m mojo_opset_triton.tune                 # tune, write configs/<gpu>.json, print the table
    python -m mojo_opset_triton.tune --no-tune       # time the current configs only
    python -m mojo_opset_triton.tune --shapes qwen3 --tokens 1 64 --json out.json

For each model shape and token count it times the routed-expert forward (given routed ids) of
(a) the ``torch._grouped_mm`` path (sort + two grouped GEMMs + scatter: the core's
``compose_forward`` with the torch backend) and (b) the fused Triton kernels, T <= 256 replayed from
a CUDA graph, and reports the roofline max(active expert bytes / copy bandwidth, FLOPs / bf16 matmul
peak), both peaks measured at the start of the run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from .configs import CONFIG_DIR, gpu_file_name, heuristic, shape_key
from .moe import fused_moe_forward

SHAPES = {  # name: (H, I, E, K, routing options)
    "mixtral": (4096, 14336, 8, 2, {}),
    "qwen3": (2048, 768, 128, 8, dict(route_norm=True)),
    "deepseek": (7168, 2048, 256, 8, dict(score_func="sigmoid", route_norm=True, route_scale=2.5,
                                         num_expert_groups=8, num_limited_groups=4, bias=True)),
}
TOKENS = (1, 16, 64, 256, 2048, 8192)
GRAPH_MAX_T = 256


def _time_eager(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    # size the repetitions to about 100 ms per measurement
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    reps = int(max(5, min(reps * 5, 0.1 / max(one, 1e-6))))
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))


def _time_graph(fn, reps=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        g.replay()
        end[i].record()
    torch.cuda.synchronize()
    del g
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))


def time_ms(fn, T):
    return _time_graph(fn) if T <= GRAPH_MAX_T else _time_eager(fn)


def measure_peaks():
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), measured here."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = _time_eager(lambda: b.copy_(a))
    bw = 2 * a.numel() / (ms * 1e-3)
    del a, b
    n = 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _time_eager(lambda: x @ y)
    return bw, 2 * n ** 3 / (ms * 1e-3)


def make_case(name, T, seed=0):
    from mojo_opset.ops.gating import gating_reference

    H, I, E, K, opts = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
    logits = torch.randn(T, E, device="cuda", generator=g)
    opts = dict(opts)
    bias = torch.randn(E, device="cuda", generator=g) * 0.01 if opts.pop("bias", False) else None
    G = opts.pop("num_expert_groups", 1)
    L = opts.pop("num_limited_groups", G)
    ids, w, _ = gating_reference(logits, K, expert_bias=bias, num_expert_groups=G, num_limited_groups=L, **opts)
    return x, ids, w


def roofline_ms(name, ids, bw, peak):
    H, I, E, K, _ = SHAPES[name]
    active = int(torch.unique(ids).numel())
    bytes_ = active * 3 * H * I * 2
    flops = 2 * ids.numel() * 3 * H * I
    return max(bytes_ / bw, flops / peak) * 1e3


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


def _try(fn, T):
    try:
        return time_ms(fn, T)
    except Exception as exc:  # out of shared memory / registers for this tile: skip it
        if "OutOfResources" not in type(exc).__name__ and "out of resource" not in str(exc).lower():
            print(f"    config failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        torch.cuda.synchronize()
        return float("inf")


def tune_point(name, T, x, ids, w, w13, w2):
    H, I, E, K, _ = SHAPES[name]
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
            t = _try(lambda: fused_moe_forward(x, ids, w, w13, w2, _cfg(bm, c, down_fixed)), T)
            if t < t_up:
                t_up, up_best = t, c
        if up_best is None:
            continue
        t_dn, dn_best = float("inf"), None
        for c in cands:
            t = _try(lambda: fused_moe_forward(x, ids, w, w13, w2, _cfg(bm, up_best, c)), T)
            if t < t_dn:
                t_dn, dn_best = t, c
        if dn_best is not None and t_dn < best_t:
            best_t, best = t_dn, _cfg(bm, up_best, dn_best)
    return best, best_t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    ap.add_argument("--no-tune", action="store_true", help="time the current configs, do not search")
    ap.add_argument("--config-out", default=None, help="where to write the tuned JSON "
                    "(default: configs/<gpu>.json in the package, merged with what is there)")
    ap.add_argument("--json", default=None, help="write the timing table as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tuning needs a CUDA GPU")
    from mojo_opset.ops.forward import compose_forward

    from . import configs as cfgmod

    dev_name = torch.cuda.get_device_name()
    bw, peak = measure_peaks()
    print(f"device {dev_name}; copy bandwidth {bw / 1e12:.2f} TB/s; bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    out_path = args.config_out or os.path.join(CONFIG_DIR, gpu_file_name(dev_name))
    try:
        with open(out_path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table.update({"device": dev_name, "torch": torch.__version__})
    import triton
    table["triton"] = triton.__version__
    table.setdefault("configs", {})
    rows = []
    for name in args.shapes:
        H, I, E, K, _ = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(1)
        w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        key = shape_key(torch.bfloat16, E, H, I, K)
        for T in args.tokens:
            x, ids, w = make_case(name, T)
            roof = roofline_ms(name, ids, bw, peak)
            t_ref = time_ms(lambda: compose_forward(x, ids, w, w13, w2, backend="torch"), T)
            if args.no_tune:
                cfg = None
                t_tri = time_ms(lambda: fused_moe_forward(x, ids, w, w13, w2), T)
            else:
                t0 = time.time()
                cfg, t_tri = tune_point(name, T, x, ids, w, w13, w2)
                table["configs"].setdefault(key, {})[str(T)] = cfg
                print(f"  tuned {name} T={T} in {time.time() - t0:.0f}s: {json.dumps(cfg)}", flush=True)
            y = fused_moe_forward(x, ids, w, w13, w2, cfg)
            ref = compose_forward(x, ids, w, w13, w2, backend="torch")
            err = float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
            row = dict(shape=name, T=T, grouped_mm_ms=t_ref, triton_ms=t_tri, roofline_ms=roof,
                       speedup=t_ref / t_tri, roofline_frac=roof / t_tri, rel_err=err)
            rows.append(row)
            print(f"{name:9s} T={T:5d}  grouped_mm {t_ref:8.3f} ms  triton {t_tri:8.3f} ms  roofline {roof:7.3f} ms"
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
                           copy_bandwidth=bw, bf16_peak=peak, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
