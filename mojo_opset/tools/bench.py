"""``mojo-opset bench``: MoE forward (and its parts) for model shapes and token counts.

In one run, on one device: the chosen backend (default: the device's default), the reference
per-expert loop and the ``torch._grouped_mm`` path; milliseconds, TFLOP/s, GB/s and the fraction of
the roofline ``max(active expert weight bytes / bandwidth, FLOPs / bf16 peak)`` with both peaks
measured in the same run.  Token counts up to ``--graph-max-tokens`` (256) are also timed replayed
from a CUDA graph, as an inference engine runs decode steps.
"""
from __future__ import annotations

import gc
import importlib.util
import sys
import time

from . import env as _env
from .args import parse_list, unknown_name
from .bench_models import DEFAULT_TOKENS, QUICK_TOKENS
from .bench_report import PARTS, render_forward, render_parts, spec_summary
from .table import say

INTERPRETED_TOKENS = (1, 8)    # Triton kernels in the interpreter take ~0.1 s per token-row
PATHS = ("backend", "grouped_mm", "loop")


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
    p.add_argument("--paths", default=",".join(PATHS),
                   help="forward paths: backend, grouped_mm, loop (default: all)")
    p.add_argument("--no-deterministic", action="store_true",
                   help="do not time the backend's forward under mo.deterministic() (its cost is reported)")
    p.add_argument("--against", metavar="LIB[,LIB]",
                   help="also time the routed experts through other libraries' fused MoE, when installed: "
                        "flaggems, vllm, hf (transformers' grouped_mm experts), or all")
    p.add_argument("--no-host-time", action="store_true",
                   help="skip the host time per eager and compiled moe_forward call at T=1")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and token counts with few iterations (CPU, CI); the default on a CPU")
    p.add_argument("--no-graph", action="store_true", help="do not time CUDA-graph replays")
    p.add_argument("--graph-max-tokens", type=int, default=256, help="largest T also timed from a CUDA graph")
    p.add_argument("--experts-cap", type=int, help="use at most this many experts per model (memory)")
    p.add_argument("--warmup", type=int, default=3, metavar="N",
                   help="untimed calls before each measurement (default: 3)")
    p.add_argument("--min-iters", type=int, default=10, metavar="N",
                   help="timed calls per measurement, at least (default: 10)")
    p.add_argument("--max-iters", type=int, default=200, metavar="N",
                   help="timed calls per measurement, at most (default: 200)")
    p.add_argument("--min-time", type=float, default=0.25, help="seconds of timed iterations per measurement")
    p.add_argument("--no-flush-l2", action="store_true", help="keep the L2 cache warm between iterations")
    p.add_argument("--roofline", choices=("measured", "datasheet"), default="measured",
                   help="peaks the roofline uses (default: measured in this run)")
    p.add_argument("--peak-bw", type=float, metavar="TB/S", help="override the roofline's bandwidth")
    p.add_argument("--peak-tflops", type=float, metavar="TFLOP/S", help="override the roofline's bf16 peak")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens (default: 0)")
    p.add_argument("--json", metavar="PATH", help="write all measurements as JSON")
    p.add_argument("--plot", metavar="PATH.png",
                   help="write a plot (needs matplotlib: pip install 'mojo-opset[bench]')")
    p.add_argument("--markdown", metavar="PATH", help="write the forward table as Markdown")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--train", action="store_true",
                   help="time a training step (forward + backward, peak memory) against the grouped_mm autograd "
                        "recipe and the torch reference (T in 4096,16384 by default)")
    p.add_argument("--quant", metavar="SCHEME[,SCHEME]",
                   help="time quant_moe_forward with these schemes (or 'all') against the float forward on the "
                        "same backend, with a roofline from the bytes each scheme reads")
    p.set_defaults(func=run)


class BenchError(Exception):
    """A usage error (exit status 2)."""


# --------------------------------------------------------------------------- the timed callables

def _served(fn, part: str):
    """Run fn once: which implementation served the part's op and each op it went through.  A path
    that calls the reference functions directly dispatches nothing: it reads as ``reference``."""
    from .served import served_call

    _, served = served_call(fn, "moe_" + part)
    if served.served_by == "not dispatched":
        served.served_by = "reference"
    return served


def _reference_forward(x, w, K, experts_fn):
    """The plain-PyTorch MoE forward: reference routing, sort, ``experts_fn``, combine."""
    import mojo_opset as mo
    from mojo_opset.reference.combine import combine_reference
    from mojo_opset.reference.permute import permute_reference

    ids, weights = mo.moe_gating(x, w.gate_weight, K, backend="torch", **w.routing)
    px, _counts, ends, _row_src, pair_row = permute_reference(x, ids, w.w13.shape[0], 1)
    y = experts_fn(px, ends, w.w13, w.w2)
    return combine_reference(y, pair_row, weights, x.shape[0])


def forward_paths(backend: str, x, w, K: int, wanted: list[str]) -> dict:
    """``{path: (callable, graph_capturable)}`` for the MoE forward."""
    import mojo_opset as mo
    from mojo_opset.reference.experts import can_use_grouped_mm, experts_grouped_mm, experts_loop

    paths = {}
    if "backend" in wanted:
        paths[backend] = (lambda: mo.moe_forward(x, w.gate_weight, w.w13, w.w2, K, backend=backend, **w.routing), True)

    if "grouped_mm" in wanted and can_use_grouped_mm(x, w.w2):
        paths["grouped_mm"] = (lambda: _reference_forward(x, w, K, experts_grouped_mm), True)
    if "loop" in wanted:
        # the loop reads group sizes on the host: it cannot be captured in a CUDA graph
        paths["loop"] = (lambda: _reference_forward(x, w, K, experts_loop), False)
    return paths


DETERMINISTIC = "deterministic"


def deterministic_path(backend: str, x, w, K: int) -> dict:
    """The backend's forward under ``mo.deterministic()`` (timed as its own part: its cost)."""
    import mojo_opset as mo

    def det():
        with mo.deterministic():
            return mo.moe_forward(x, w.gate_weight, w.w13, w.w2, K, backend=backend, **w.routing)

    # the reference's deterministic experts read group sizes on the host: no CUDA graph there
    return {backend: (det, backend != "torch")}


def deterministic_summary(results, backend: str) -> dict | None:
    """The deterministic mode's time over the default mode's, per point (graph times where both exist)."""
    from .bench_report import best_record, measured_points

    ratios = []
    for model, _E, ts in measured_points(results, DETERMINISTIC):
        for T in ts:
            d, dm = best_record(results, model, T, DETERMINISTIC, backend)
            b, bm = best_record(results, model, T, "forward", backend)
            if d and b and dm == bm:
                ratios.append((d["ms"] / b["ms"], model, T))
    if not ratios:
        return None
    ratios.sort()
    med = ratios[len(ratios) // 2][0]
    return {"median": med, "min": ratios[0][0], "max": ratios[-1][0], "worst": ratios[-1][1:],
            "text": f"deterministic mode ({backend}): {med:.2f}x the default forward's time (median over "
                    f"{len(ratios)} points; {ratios[0][0]:.2f}x to {ratios[-1][0]:.2f}x, worst at "
                    f"{ratios[-1][1]} T={ratios[-1][2]})"}


def part_paths(part: str, backend: str, x, w, K: int) -> dict:
    """``{path: (callable, graph_capturable)}`` for one part, on inputs prepared by the reference."""
    import mojo_opset as mo
    from mojo_opset.contract.calls import CombineCall, ExpertsCall, PermuteCall
    from mojo_opset.functional.combine import combine
    from mojo_opset.functional.experts import experts
    from mojo_opset.functional.permute import permute
    from mojo_opset.reference.combine import combine_reference
    from mojo_opset.reference.experts import can_use_grouped_mm, experts_grouped_mm, experts_loop, experts_reference
    from mojo_opset.reference.gating import gating_reference
    from mojo_opset.reference.permute import permute_reference
    from mojo_opset.reference.router_gemm import router_logits

    from .compare_ops import experts_align_for

    E = w.w13.shape[0]
    ids, weights = mo.moe_gating(x, w.gate_weight, K, backend="torch", **w.routing)
    if part == "gating":
        opts = dict(w.routing)
        G = opts.get("num_expert_groups", 1)
        opts.setdefault("num_limited_groups", G)
        return {backend: (lambda: mo.moe_gating(x, w.gate_weight, K, backend=backend, **w.routing), True),
                "reference": (lambda: gating_reference(router_logits(x, w.gate_weight), K, **opts), True)}
    align = experts_align_for(backend)
    if part == "permute":
        call = PermuteCall(x=x, topk_ids=ids, num_experts=E, align=align)
        return {backend: (lambda: permute(call, backend), True),
                "reference": (lambda: permute_reference(x, ids, E, 1), True)}
    px, _c, ends, _r, pair_row = permute_reference(x, ids, E, align)
    if part == "experts":
        call = ExpertsCall(permuted_x=px, group_ends=ends, w13=w.w13, w2=w.w2)
        px1, _c1, ends1, _r1, _p1 = permute_reference(x, ids, E, 1)
        out = {backend: (lambda: experts(call, backend), True)}
        if can_use_grouped_mm(x, w.w2):
            out["grouped_mm"] = (lambda: experts_grouped_mm(px1, ends1, w.w13, w.w2), True)
        out["loop"] = (lambda: experts_loop(px1, ends1, w.w13, w.w2), False)
        return out
    if part == "combine":
        y = experts_reference(px, ends, w.w13, w.w2)
        call = CombineCall(expert_out=y, pair_row=pair_row, topk_weights=weights, num_tokens=x.shape[0])
        return {backend: (lambda: combine(call, backend), True),
                "reference": (lambda: combine_reference(y, pair_row, weights, x.shape[0]), True)}
    raise ValueError(f"unknown part {part!r}")


# --------------------------------------------------------------------------- measurement

def dispatch_overhead(device, timer_factory) -> dict:
    """Host time per call of mo.moe_gating on a tiny input vs the reference function called directly."""
    import torch

    import mojo_opset as mo
    from mojo_opset.reference.gating import gating_reference
    from mojo_opset import dispatch as _dispatch
    from mojo_opset.contract.calls import ForwardCall, GatingCall, RoutingOptions
    from mojo_opset.contract.names import MOE_FORWARD, MOE_GATING
    from mojo_opset.reference.router_gemm import router_logits

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
    call = GatingCall(logits=router_logits(x, w), routing=RoutingOptions(top_k=2))
    dec = timer(loop(lambda: _dispatch.decide(call, default)))
    out[f"decide_{default}_us"] = dec.ms_min * 1e3 / n
    fwd = ForwardCall(x=x, topk_ids=torch.zeros(4, 2, dtype=torch.int32, device=device),
                      topk_weights=torch.ones(4, 2, device=device), w13=torch.zeros(8, 32, 64, device=device),
                      w2=torch.zeros(8, 64, 16, device=device))
    default_fwd = mo.select_backend(MOE_FORWARD, device.type)
    dec = timer(loop(lambda: _dispatch.decide(fwd, default_fwd)))
    out[f"decide_forward_{default_fwd}_us"] = dec.ms_min * 1e3 / n
    return out


def _roofline_ms(flops: int, nbytes: int, bw_tbs: float, tflops: float) -> float:
    return max(nbytes / (bw_tbs * 1e12), flops / (tflops * 1e12)) * 1e3


def _timing_record(model, T, part, path, mode, t, flops, nbytes, roof_ms, served):
    rec = {"model": model.name, "experts": model.E, "T": T, "part": part, "path": path, "mode": mode,
           "ms": t.ms, "ms_min": t.ms_min, "iters": t.iters, "served_by": served.served_by,
           "served": served.records, "reasons": served.reasons}
    if flops:
        rec["tflops"] = flops / (t.ms * 1e-3) / 1e12
        rec["gbs"] = nbytes / (t.ms * 1e-3) / 1e9
        rec["roofline_ms"] = roof_ms
        rec["roofline_frac"] = roof_ms / t.ms
    return rec


def run(args) -> int:
    # before anything imports triton: on a CPU-only machine the Triton-kernel backends run their
    # kernels in the interpreter (as compare does), on the tiny --quick shapes
    _env.enable_interpreter_if_cpu_only()
    import torch

    import mojo_opset as mo

    from .bench_models import DEFAULT_MODELS, QUICK_MODELS, fit_to_memory, make_tokens, make_weights, resolve
    from .bench_timing import measure_peaks, timer_from_args, write_json
    from .compare import DTYPE_ALIASES
    from .compare_cases import DTYPES
    from .progress import progress

    try:
        device = _env.pick_device(args.device)
        if args.plot and importlib.util.find_spec("matplotlib") is None:  # before hours of measuring
            raise BenchError("--plot needs matplotlib: pip install 'mojo-opset[bench]'")
        dname = DTYPE_ALIASES.get(args.dtype.lower())
        if dname is None:
            raise BenchError(unknown_name("--dtype", "dtype", args.dtype, ("bf16", "fp16", "fp32")))
        dtype = DTYPES[dname]
        quick = args.quick or (device.type == "cpu" and not args.models)
        models = resolve(parse_list(args.models) or list(QUICK_MODELS if quick else DEFAULT_MODELS))
        if args.experts_cap:
            models = [m_.capped(args.experts_cap) for m_ in models]
        tokens = parse_list(args.tokens, int)
        if tokens and any(t < 1 for t in tokens):
            raise BenchError("--tokens: token counts must be >= 1")
        parts = [] if args.parts.strip().lower() == "none" else parse_list(args.parts)
        for p in parts:
            if p not in PARTS:
                raise BenchError(unknown_name("--parts", "part", p, PARTS + ("none",)))
        paths = parse_list(args.paths)
        for p in paths:
            if p not in PATHS:
                raise BenchError(unknown_name("--paths", "path", p, PATHS))
        default = mo.select_backend("moe_forward", device.type)   # a wrong MOJO_BACKEND* fails here
        backend = args.backend or default
        if backend != "torch":
            avail = mo.available_backends()
            if backend not in avail:
                raise BenchError(unknown_name("--backend", "backend", backend, avail))
            if not avail[backend]["available"]:
                raise BenchError(f"--backend {backend}: unavailable: {avail[backend]['reason']}")
        interpreted = device.type == "cpu" and _env.interpreter_on() and backend != "torch"
        tokens = tokens or list(INTERPRETED_TOKENS if interpreted else QUICK_TOKENS if quick else DEFAULT_TOKENS)
        peers = []
        if args.against:
            from . import bench_against

            peers = bench_against.resolve(args.against)
    except (BenchError, ValueError, mo.BackendError) as exc:
        say(f"mojo-opset bench: {exc}", file=sys.stderr)
        return 2
    if args.train:
        from .bench_train import run_train

        return run_train(args, device, dtype, dname, backend, models, quick)
    if args.quant:
        from .bench_quant import run_quant

        return run_quant(args, device, dtype, dname, backend, models, quick)

    if quick:
        args.warmup, args.min_iters, args.max_iters, args.min_time = min(args.warmup, 1), 3, 10, 0.02
    if interpreted:
        args.warmup, args.min_iters, args.max_iters = 0, 1, 2
    use_graph = device.type == "cuda" and not args.no_graph

    def timer_factory(host: bool = False):
        return timer_from_args(args, device, host)

    timer = timer_factory()
    dev_name, header = _env.run_header(device, backend)
    say(f"mojo-opset bench on {header}; dtype {dname}")
    if device.type == "cpu" and not args.quick and quick:
        say("note: no GPU: tiny shapes (--quick); name --models to time model shapes on the CPU")
    if interpreted and _env.interpreter_caveat():
        say(f"warning: {_env.interpreter_caveat()}")
    if interpreted:
        say(f"note: no GPU: the {backend} kernels run in the Triton interpreter (TRITON_INTERPRET=1) on "
            f"T = {', '.join(map(str, tokens))}: their times show that they run, not how fast")

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
    say(line + f"; roofline uses {bw:.3g} TB/s, {tf:.4g} TFLOP/s")
    overhead = dispatch_overhead(device, timer_factory)
    say(f"dispatch overhead: mo.moe_gating {overhead['moe_gating_us']:.1f} us/call vs reference called "
        f"directly {overhead['direct_reference_us']:.1f} us/call -> {overhead['overhead_us']:.1f} us"
        + "".join(f"; {k[:-3].replace('_', ' ')} {val:.2f} us" for k, val in overhead.items()
                  if k.startswith("decide_")))

    peer_notes = {}
    for peer in list(peers):
        reason = bench_against.available(peer)
        if reason:
            peer_notes[peer.name] = reason
            peers.remove(peer)
            say(f"--against {peer.name}: skipped: {reason}")
    host = {}
    with_det = not args.no_deterministic and "backend" in paths
    total = len(models) * len(tokens) * (1 + len(parts) + bool(peers) + with_det)
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
        if not args.no_host_time and (device.type == "cuda" or backend == "torch"):
            from .bench_host import describe, host_times

            host[model.name] = host_times(make_tokens(model, 1, dtype, device, args.seed), w, model.K, backend,
                                          device, compiled=device.type == "cuda")
            say(describe(model.name, host[model.name]))
        for T in tokens:
            x = make_tokens(model, T, dtype, device, args.seed)
            ids, _ = mo.moe_gating(x, w.gate_weight, model.K, backend="torch", **w.routing)
            active = int(torch.unique(ids).numel())
            flops, nbytes = model.flops(T), model.weight_bytes(dtype, active)
            roof = _roofline_ms(flops, nbytes, bw, tf)
            jobs = [("forward", forward_paths(backend, x, w, model.K, paths))]
            jobs += [(p, None) for p in parts]
            if with_det:
                jobs.append((DETERMINISTIC, deterministic_path(backend, x, w, model.K)))
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
            if peers:
                bar.set_postfix_str(f"{model.name} T={T} against")
                fns, skipped = bench_against.point_paths(peers, backend, x, w, model.K, dname)
                for name, reason in skipped.items():
                    peer_notes.setdefault(name, f"T={T}: {reason}")
                for path, (fn, capturable) in fns.items():
                    results += _measure(model, T, bench_against.PART, path, fn, capturable, timer, device,
                                        use_graph and T <= args.graph_max_tokens, flops, nbytes, roof)
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
    det_cost = deterministic_summary(results, backend)
    if det_cost:
        say(det_cost["text"])
    if peers or peer_notes:
        from . import bench_against

        print(bench_against.render_peers(results, backend))
        for name, reason in peer_notes.items():
            say(f"note: --against {name}: {reason}")
    for n in notes:
        say(f"note: {n}")
    print(f"{len(results)} measurements in {elapsed:.1f}s")
    data = {"environment": _env.environment(device), "device_name": dev_name, "backend": backend, "dtype": dname,
            "peaks": peaks, "dispatch_overhead": overhead, "host_time": host, "against_skipped": peer_notes,
            "notes": notes,
            "config": {"models": [m_.name for m_ in models], "tokens": tokens, "parts": parts, "paths": paths,
                       "graph_max_tokens": args.graph_max_tokens if use_graph else 0,
                       "flush_l2": not args.no_flush_l2, "roofline": args.roofline, "quick": quick},
            "summary": {k: v_ for k, v_ in (summary or {}).items() if k != "text"},
            "deterministic_cost": {k: v_ for k, v_ in (det_cost or {}).items() if k != "text"}, "results": results}
    if args.json:
        write_json(args.json, data)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(render_forward(results, backend, markdown=True) + "\n")
    if args.plot:
        from .bench_plot import plot

        plot(data, args.plot)
        if peers:
            bench_against.plot_peers(data, args.plot[:-4] + "-peers.png" if args.plot.endswith(".png")
                                     else args.plot + "-peers.png")
    return 0


def _measure(model, T, part, path, fn, capturable, timer, device, graph, flops, nbytes, roof):
    """Eager timing, and CUDA-graph replay timing when asked and possible."""
    out = []
    try:
        from mojo_opset.functional import eager_graphs

        served = _served(fn, part)
        before = eager_graphs.stats()["replays"]
        t = timer(fn)
        rec = _timing_record(model, T, part, path, "eager", t, flops, nbytes, roof, served)
        # eager calls that the library replayed from its own CUDA graphs (docs/architecture.md)
        rec["replayed"] = eager_graphs.stats()["replays"] > before
        out.append(rec)
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
