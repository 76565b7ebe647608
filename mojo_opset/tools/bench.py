"""``mojo-opset bench``: MoE forward (and its parts) for model shapes and token counts.

In one run, on one device: the chosen backend (default: the device's default), the reference
per-expert loop and the ``torch._grouped_mm`` path; milliseconds, TFLOP/s, GB/s and the fraction of
the roofline ``max(active expert weight bytes / bandwidth, FLOPs / bf16 peak)`` with both peaks
measured in the same run.  Token counts up to ``--graph-max-tokens`` (256) are also timed replayed
from a CUDA graph, as an inference engine runs decode steps.
"""
from __future__ import annotations

import gc
import json
import sys
import time

from . import env as _env
from .table import fmt_num, render

DEFAULT_TOKENS = (1, 16, 64, 256, 2048, 8192)
QUICK_TOKENS = (1, 16, 64)
PARTS = ("gating", "permute", "experts", "combine")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time MoE forward and its parts against the reference and grouped_mm paths",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--backend", help="backend to time (default: the device's default backend)")
    p.add_argument("--device", help="torch device (default: cuda, else npu, else cpu)")
    p.add_argument("--models", help="comma-separated: mixtral, qwen3, deepseek (default: all three; "
                                    "tiny, tiny-grouped for CPU)")
    p.add_argument("--tokens", help="comma-separated token counts (default: 1,16,64,256,2048,8192)")
    p.add_argument("--dtype", default="bf16", help="activation/weight dtype: bf16 (default), fp16, fp32")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="parts to time besides the forward (default: all of gating,permute,experts,combine; "
                        "'none' for none)")
    p.add_argument("--paths", default="backend,grouped_mm,loop",
                   help="forward paths: backend, grouped_mm, loop (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and token counts with few iterations (CPU, CI); the default on a CPU")
    p.add_argument("--no-graph", action="store_true", help="do not time CUDA-graph replays")
    p.add_argument("--graph-max-tokens", type=int, default=256, help="largest T also timed from a CUDA graph")
    p.add_argument("--experts-cap", type=int, help="use at most this many experts per model (memory)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-iters", type=int, default=10)
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--min-time", type=float, default=0.25, help="seconds of timed iterations per measurement")
    p.add_argument("--no-flush-l2", action="store_true", help="keep the L2 cache warm between iterations")
    p.add_argument("--roofline", choices=("measured", "datasheet"), default="measured",
                   help="peaks the roofline uses (default: measured in this run)")
    p.add_argument("--peak-bw", type=float, metavar="TB/S", help="override the roofline's bandwidth")
    p.add_argument("--peak-tflops", type=float, metavar="TFLOP/S", help="override the roofline's bf16 peak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write all measurements as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="write a plot (needs matplotlib)")
    p.add_argument("--markdown", metavar="PATH", help="write the forward table as Markdown")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _list(text: str | None, conv=str):
    return [conv(t.strip()) for t in text.split(",") if t.strip()] if text else None


class BenchError(Exception):
    """A usage error (exit status 2)."""


# --------------------------------------------------------------------------- the timed callables

def _served(fn) -> tuple[str, list[str]]:
    """Run fn once and summarise which implementation served each dispatched op."""
    import mojo_opset as mo

    from .compare import _summarize_served

    mo.reset_stats()
    fn()
    served_by, reasons = _summarize_served(mo.last_served())
    return served_by, reasons


def _reference_forward(x, w, K, experts_fn):
    """The plain-PyTorch MoE forward: reference routing, sort, ``experts_fn``, combine."""
    import mojo_opset as mo
    from mojo_opset.ops.combine import combine_reference
    from mojo_opset.ops.permute import permute_reference

    ids, weights = mo.moe_gating(x, w.gate_weight, K, backend="torch", **w.routing)
    px, _counts, ends, _row_src, pair_row = permute_reference(x, ids, w.w13.shape[0], 1)
    y = experts_fn(px, ends, w.w13, w.w2)
    return combine_reference(y, pair_row, weights, x.shape[0])


def forward_paths(backend: str, x, w, K: int, wanted: list[str]) -> dict:
    """``{path: (callable, graph_capturable)}`` for the MoE forward."""
    import mojo_opset as mo
    from mojo_opset.ops.experts import can_use_grouped_mm, experts_grouped_mm, experts_loop

    paths = {}
    if "backend" in wanted:
        paths[backend] = (lambda: mo.moe_forward(x, w.gate_weight, w.w13, w.w2, K, backend=backend, **w.routing), True)
    if "grouped_mm" in wanted and can_use_grouped_mm(x, w.w2):
        paths["grouped_mm"] = (lambda: _reference_forward(x, w, K, experts_grouped_mm), True)
    if "loop" in wanted:
        # the loop reads group sizes on the host: it cannot be captured in a CUDA graph
        paths["loop"] = (lambda: _reference_forward(x, w, K, experts_loop), False)
    return paths


def part_paths(part: str, backend: str, x, w, K: int) -> dict:
    """``{path: (callable, graph_capturable)}`` for one part, on inputs prepared by the reference."""
    import mojo_opset as mo
    from mojo_opset import dispatch as _dispatch
    from mojo_opset.ops.combine import combine_reference
    from mojo_opset.ops.experts import can_use_grouped_mm, experts_grouped_mm, experts_loop, experts_reference
    from mojo_opset.ops.gating import gating_reference
    from mojo_opset.ops.names import MOE_COMBINE, MOE_EXPERTS, MOE_PERMUTE
    from mojo_opset.ops.permute import permute_reference
    from mojo_opset.ops.router_gemm import router_logits

    from .compare_ops import experts_align_for

    dev, E = x.device, w.w13.shape[0]
    ids, weights = mo.moe_gating(x, w.gate_weight, K, backend="torch", **w.routing)
    if part == "gating":
        opts = dict(w.routing)
        G = opts.get("num_expert_groups", 1)
        opts.setdefault("num_limited_groups", G)
        return {backend: (lambda: mo.moe_gating(x, w.gate_weight, K, backend=backend, **w.routing), True),
                "reference": (lambda: gating_reference(router_logits(x, w.gate_weight), K, **opts), True)}
    align = experts_align_for(backend)
    if part == "permute":
        call = dict(x=x, topk_ids=ids, num_experts=E, align=align)
        return {backend: (lambda: _dispatch.dispatch(MOE_PERMUTE, permute_reference, call, device=dev,
                                                     backend=backend), True),
                "reference": (lambda: permute_reference(x, ids, E, 1), True)}
    px, _c, ends, _r, pair_row = permute_reference(x, ids, E, align)
    if part == "experts":
        call = dict(permuted_x=px, group_ends=ends, w13=w.w13, w2=w.w2, activation="swiglu")
        px1, _c1, ends1, _r1, _p1 = permute_reference(x, ids, E, 1)
        out = {backend: (lambda: _dispatch.dispatch(MOE_EXPERTS, experts_reference, call, device=dev,
                                                    backend=backend), True)}
        if can_use_grouped_mm(x, w.w2):
            out["grouped_mm"] = (lambda: experts_grouped_mm(px1, ends1, w.w13, w.w2), True)
        out["loop"] = (lambda: experts_loop(px1, ends1, w.w13, w.w2), False)
        return out
    if part == "combine":
        y = experts_reference(px, ends, w.w13, w.w2)
        call = dict(expert_out=y, pair_row=pair_row, topk_weights=weights, num_tokens=x.shape[0])
        return {backend: (lambda: _dispatch.dispatch(MOE_COMBINE, combine_reference, call, device=dev,
                                                     backend=backend), True),
                "reference": (lambda: combine_reference(y, pair_row, weights, x.shape[0]), True)}
    raise ValueError(f"unknown part {part!r}")


# --------------------------------------------------------------------------- measurement

def dispatch_overhead(device, timer_factory) -> dict:
    """Host time per call of mo.moe_gating on a tiny input vs the reference function called directly."""
    import torch

    import mojo_opset as mo
    from mojo_opset.ops.gating import gating_reference
    from mojo_opset.ops.names import MOE_GATING
    from mojo_opset.ops.router_gemm import router_logits
    from mojo_opset import dispatch as _dispatch

    x = torch.randn(4, 64, device=device)
    w = torch.randn(8, 64, device=device)
    n = 300 if device.type != "cpu" else 20
    timer = timer_factory(host=True)

    def loop(fn):
        def run():
            for _ in range(n):
                fn()
        return run

    via = timer(loop(lambda: mo.moe_gating(x, w, 2, backend="torch")))
    direct = timer(loop(lambda: gating_reference(router_logits(x, w), 2)))
    # the minimum over repetitions: host overhead is what remains when nothing else interferes
    out = {"calls_per_measurement": n, "moe_gating_us": via.ms_min * 1e3 / n,
           "direct_reference_us": direct.ms_min * 1e3 / n}
    out["overhead_us"] = out["moe_gating_us"] - out["direct_reference_us"]
    default = mo.select_backend(MOE_GATING, device.type)
    if default != "torch":
        logits = router_logits(x, w)
        call = dict(logits=logits, top_k=2, score_func="softmax", route_norm=False, route_scale=1.0,
                    expert_bias=None, num_expert_groups=1, num_limited_groups=1, group_score="top2_sum",
                    forced_expert_ids=None)
        dec = timer(loop(lambda: _dispatch.decide(MOE_GATING, device.type, call, default)))
        out[f"decide_{default}_us"] = dec.ms_min * 1e3 / n
    return out


def measure_peaks(device, timer, quick: bool) -> dict:
    from .bench_timing import datasheet_for, measure_bandwidth, measure_matmul

    import torch

    nbytes = (64 << 20) if quick or device.type != "cuda" else (1 << 30)
    n = 256 if quick or device.type != "cuda" else 8192
    measured = {"bandwidth_tbs": measure_bandwidth(device, timer, nbytes),
                "bf16_tflops": measure_matmul(device, timer, n),
                "how": f"device-to-device copy of {nbytes >> 20} MiB; bf16 {n}x{n}x{n} matmul"}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {"measured": measured, "datasheet": datasheet_for(name) if name else None}


def _roofline_ms(flops: int, nbytes: int, bw_tbs: float, tflops: float) -> float:
    return max(nbytes / (bw_tbs * 1e12), flops / (tflops * 1e12)) * 1e3


def _timing_record(model, T, part, path, mode, t, flops, nbytes, roof_ms, served):
    rec = {"model": model.name, "experts": model.E, "T": T, "part": part, "path": path, "mode": mode,
           "ms": t.ms, "ms_min": t.ms_min, "iters": t.iters, "served_by": served[0], "reasons": served[1]}
    if flops:
        rec["tflops"] = flops / (t.ms * 1e-3) / 1e12
        rec["gbs"] = nbytes / (t.ms * 1e-3) / 1e9
        rec["roofline_ms"] = roof_ms
        rec["roofline_frac"] = roof_ms / t.ms
    return rec


def run(args) -> int:
    import torch

    import mojo_opset as mo

    from .bench_models import DEFAULT_MODELS, QUICK_MODELS, fit_to_memory, make_tokens, make_weights, resolve
    from .bench_timing import Timer
    from .compare import DTYPE_ALIASES
    from .compare_cases import DTYPES
    from .progress import progress

    try:
        device = _env.pick_device(args.device)
        dname = DTYPE_ALIASES.get(args.dtype.lower())
        if dname is None:
            raise BenchError(f"--dtype: expected bf16, fp16 or fp32, got {args.dtype!r}")
        dtype = DTYPES[dname]
        quick = args.quick or (device.type == "cpu" and not args.models)
        models = resolve(_list(args.models) or list(QUICK_MODELS if quick else DEFAULT_MODELS))
        if args.experts_cap:
            models = [m_.capped(args.experts_cap) for m_ in models]
        tokens = _list(args.tokens, int) or list(QUICK_TOKENS if quick else DEFAULT_TOKENS)
        if any(t < 1 for t in tokens):
            raise BenchError("--tokens: token counts must be >= 1")
        parts = [] if args.parts.strip().lower() == "none" else _list(args.parts)
        for p in parts:
            if p not in PARTS:
                raise BenchError(f"--parts: unknown part {p!r}; expected some of {', '.join(PARTS)} or 'none'")
        paths = _list(args.paths)
        for p in paths:
            if p not in ("backend", "grouped_mm", "loop"):
                raise BenchError(f"--paths: unknown path {p!r}; expected some of backend, grouped_mm, loop")
        backend = args.backend or mo.select_backend("moe_forward", device.type)
        if backend != "torch":
            avail = mo.available_backends()
            if backend not in avail or not avail[backend]["available"]:
                why = avail[backend]["reason"] if backend in avail else f"unknown; registered: {', '.join(avail)}"
                raise BenchError(f"--backend {backend}: {why}")
    except (BenchError, ValueError) as exc:
        print(f"mojo-opset bench: {exc}", file=sys.stderr)
        return 2

    if quick:
        args.warmup, args.min_iters, args.max_iters, args.min_time = min(args.warmup, 1), 3, 10, 0.02
    use_graph = device.type == "cuda" and not args.no_graph

    def timer_factory(host: bool = False):
        dev = torch.device("cpu") if host else device
        return Timer(dev, warmup=args.warmup, min_iters=args.min_iters, max_iters=args.max_iters,
                     min_time_s=args.min_time, flush_l2=not args.no_flush_l2 and not host)

    timer = timer_factory()
    v = _env.versions()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"mojo-opset bench on {dev_name}; torch {v['torch']}, triton {v['triton'] or '-'}, "
          f"mojo_opset {v['mojo_opset']}; backend {backend}; dtype {dname}")
    if device.type == "cpu" and not args.quick and quick:
        print("note: no GPU: tiny shapes (--quick); name --models to time model shapes on the CPU")

    peaks = measure_peaks(device, timer, quick)
    m = peaks["measured"]
    ds = peaks["datasheet"]
    bw, tf = m["bandwidth_tbs"], m["bf16_tflops"]
    if args.roofline == "datasheet" and ds:
        bw, tf = ds["bandwidth_tbs"], ds["bf16_tflops"]
    bw, tf = args.peak_bw or bw, args.peak_tflops or tf
    peaks["used"] = {"bandwidth_tbs": bw, "bf16_tflops": tf}
    line = f"peaks measured: {m['bandwidth_tbs']:.3g} TB/s copy, {m['bf16_tflops']:.4g} TFLOP/s bf16"
    if ds:
        line += f"; datasheet ({ds['device']}): {ds['bandwidth_tbs']} TB/s, {ds['bf16_tflops']} TFLOP/s"
    print(line + f"; roofline uses {bw:.3g} TB/s, {tf:.4g} TFLOP/s")
    overhead = dispatch_overhead(device, timer_factory)
    print(f"dispatch overhead: mo.moe_gating {overhead['moe_gating_us']:.1f} us/call vs reference called "
          f"directly {overhead['direct_reference_us']:.1f} us/call -> {overhead['overhead_us']:.1f} us"
          + "".join(f"; {k[:-3].replace('_', ' ')} {val:.2f} us" for k, val in overhead.items()
                    if k.startswith("decide_")))

    total = len(models) * len(tokens) * (1 + len(parts))
    bar = progress(total, "bench", enabled=not args.no_progress)
    results, notes = [], []
    t_start = time.perf_counter()
    for model in models:
        headroom = 12 << 30 if max(tokens) >= 2048 else 4 << 30
        fitted = fit_to_memory(model, dtype, device, headroom)
        if fitted is not model:
            notes.append(f"{model.name}: only {fitted.E} of {model.E} experts fit in free memory")
            print(f"note: {notes[-1]}", file=sys.stderr)
        model = fitted
        if model.note:
            notes.append(f"{model.name}: {model.note}")
        w = make_weights(model, dtype, device, args.seed)
        for T in tokens:
            x = make_tokens(model, T, dtype, device, args.seed)
            ids, _ = mo.moe_gating(x, w.gate_weight, model.K, backend="torch", **w.routing)
            active = int(torch.unique(ids).numel())
            flops, nbytes = model.flops(T), model.weight_bytes(dtype, active)
            roof = _roofline_ms(flops, nbytes, bw, tf)
            jobs = [("forward", forward_paths(backend, x, w, model.K, paths))]
            jobs += [(p, None) for p in parts]
            for part, fns in jobs:
                bar.set_postfix_str(f"{model.name} T={T} {part}")
                if fns is None:
                    fns = part_paths(part, backend, x, w, model.K)
                f_flops, f_bytes = (flops, nbytes) if part in ("forward", "experts") else (0, 0)
                for path, (fn, capturable) in fns.items():
                    results += _measure(model, T, part, path, fn, capturable, timer, device,
                                        use_graph and T <= args.graph_max_tokens, f_flops, f_bytes, roof)
                del fns
                bar.update(1)
            del x
        del w
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    elapsed = time.perf_counter() - t_start

    print(render_forward(results, backend))
    if parts:
        print(render_parts(results, backend))
    summary = spec_summary(results, backend, args.graph_max_tokens)
    if summary:
        print(summary["text"])
    for n in notes:
        print(f"note: {n}")
    print(f"{len(results)} measurements in {elapsed:.1f}s")
    data = {"environment": _env.environment(device), "device_name": dev_name, "backend": backend, "dtype": dname,
            "peaks": peaks, "dispatch_overhead": overhead, "notes": notes,
            "config": {"models": [m_.name for m_ in models], "tokens": tokens, "parts": parts, "paths": paths,
                       "graph_max_tokens": args.graph_max_tokens if use_graph else 0,
                       "flush_l2": not args.no_flush_l2, "roofline": args.roofline, "quick": quick},
            "summary": {k: v_ for k, v_ in (summary or {}).items() if k != "text"}, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(render_forward(results, backend, markdown=True) + "\n")
    if args.plot:
        from .bench_plot import plot

        try:
            plot(data, args.plot)
        except ImportError:
            print("--plot needs matplotlib (pip install 'mojo-opset[bench]')", file=sys.stderr)
            return 2
    return 0


def _measure(model, T, part, path, fn, capturable, timer, device, graph, flops, nbytes, roof):
    """Eager timing, and CUDA-graph replay timing when asked and possible."""
    out = []
    try:
        served = _served(fn)
        t = timer(fn)
        out.append(_timing_record(model, T, part, path, "eager", t, flops, nbytes, roof, served))
    except Exception as exc:
        out.append({"model": model.name, "experts": model.E, "T": T, "part": part, "path": path, "mode": "eager",
                    "error": f"{type(exc).__name__}: {exc}"})
        return out
    if graph and capturable:
        from .bench_timing import capture_graph

        try:
            g = capture_graph(fn, device)
            t = timer(g.replay)
            out.append(_timing_record(model, T, part, path, "graph", t, flops, nbytes, roof, served))
            del g
        except Exception as exc:
            _recover(device)
            out.append({"model": model.name, "experts": model.E, "T": T, "part": part, "path": path,
                        "mode": "graph", "error": f"CUDA graph capture failed: {type(exc).__name__}: {exc}"})
    return out


def _recover(device) -> None:
    import torch

    try:
        torch.cuda.synchronize(device)
    except Exception:
        pass


# --------------------------------------------------------------------------- reports

def _best(results, model, T, part, path):
    """(ms, mode) of the fastest timing of a path at a point (graph replay preferred when present)."""
    recs = [r for r in results if r["model"] == model and r["T"] == T and r["part"] == part and r["path"] == path
            and "ms" in r]
    graph = [r for r in recs if r["mode"] == "graph"]
    pick = graph or recs
    return (pick[0], pick[0]["mode"]) if pick else (None, None)


def _points(results, part="forward"):
    seen = {}
    for r in results:
        if r["part"] == part:
            seen.setdefault((r["model"], r["experts"]), set()).add(r["T"])
    return [(m, e, sorted(ts)) for (m, e), ts in seen.items()]


def render_forward(results, backend: str, markdown: bool = False) -> str:
    paths = list(dict.fromkeys(r["path"] for r in results if r["part"] == "forward"))
    headers = ["model", "T", "roofline ms"]
    for p in paths:
        headers += [f"{p} ms"]
    headers += [f"{backend} of roofline", f"{backend} vs grouped_mm"]
    rows = []
    for model, E, ts in _points(results):
        for T in ts:
            roof = next((r.get("roofline_ms") for r in results if r["model"] == model and r["T"] == T
                         and r["part"] == "forward" and "roofline_ms" in r), None)
            row = [f"{model}" + ("" if not E else f" E{E}"), T, fmt_num(roof)]
            best = {}
            for p in paths:
                rec, mode = _best(results, model, T, "forward", p)
                best[p] = rec
                if rec is None:
                    err = next((r["error"] for r in results if r["model"] == model and r["T"] == T
                                and r["part"] == "forward" and r["path"] == p and "error" in r), "")
                    row.append("error" if err else "-")
                else:
                    flag = " g" if mode == "graph" else ""
                    fb = " (fallback)" if rec["served_by"] == "fallback" else ""
                    if any(r["model"] == model and r["T"] == T and r["part"] == "forward" and r["path"] == p
                           and r["mode"] == "graph" and "error" in r for r in results):
                        fb += " (graph capture failed)"
                    row.append(f"{fmt_num(rec['ms'])}{flag}{fb}")
            b, g = best.get(backend), best.get("grouped_mm")
            row.append(f"{b['roofline_frac']:.2f}" if b and "roofline_frac" in b else "-")
            row.append(f"{g['ms'] / b['ms']:.2f}x" if b and g else "-")
            rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        return "\n".join(lines)
    return ("\nMoE forward (ms; g = replayed from a CUDA graph; roofline = max(active expert weight bytes / "
            "bandwidth, FLOPs / bf16 peak))\n" + render(headers, rows))


def render_parts(results, backend: str) -> str:
    rows = []
    for part in PARTS:
        for model, E, ts in _points(results, part):
            for T in ts:
                cells = {}
                served = "-"
                for p in dict.fromkeys(r["path"] for r in results if r["part"] == part):
                    rec, mode = _best(results, model, T, part, p)
                    if rec is not None:
                        cells[p] = f"{fmt_num(rec['ms'])}{' g' if mode == 'graph' else ''}"
                        if p == backend:
                            served = rec["served_by"]
                rows.append([part, f"{model} E{E}", T, cells.get(backend, "-"), cells.get("reference", "-"),
                             cells.get("grouped_mm", "-"), cells.get("loop", "-"), served])
    return "\nparts (ms)\n" + render(["part", "model", "T", backend, "reference", "grouped_mm", "loop", "served_by"],
                                     rows)


def spec_summary(results, backend: str, graph_max: int) -> dict | None:
    """SPEC §7 figures: median and minimum fraction of the roofline over the points, and whether the
    backend beat the grouped_mm path at every point (T <= graph_max compared from CUDA graphs)."""
    fracs, wins, points = [], [], 0
    for model, _E, ts in _points(results):
        for T in ts:
            b, _ = _best(results, model, T, "forward", backend)
            g, _ = _best(results, model, T, "forward", "grouped_mm")
            if b is None or "roofline_frac" not in b:
                continue
            points += 1
            fracs.append(b["roofline_frac"])
            if g is not None:
                wins.append(b["ms"] < g["ms"])
    if not fracs:
        return None
    fracs_sorted = sorted(fracs)
    median = fracs_sorted[len(fracs) // 2] if len(fracs) % 2 else \
        (fracs_sorted[len(fracs) // 2 - 1] + fracs_sorted[len(fracs) // 2]) / 2
    out = {"points": points, "median_roofline_frac": median, "min_roofline_frac": fracs_sorted[0],
           "faster_than_grouped_mm": f"{sum(wins)}/{len(wins)}" if wins else "n/a"}
    out["text"] = (f"\n{backend}: median {median:.2f} of the roofline over {points} points (min "
                   f"{fracs_sorted[0]:.2f}); faster than grouped_mm at {out['faster_than_grouped_mm']} points")
    return out
