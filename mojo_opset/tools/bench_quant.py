"""``mojo-opset bench --quant SCHEME[,SCHEME]``: quantized MoE forward against bf16, same backend, same run.

Per model and token count: ``mo.moe_forward`` on the float weights and ``mo.quant_moe_forward`` on the
weights quantized with each scheme, both on the chosen backend (T <= ``--graph-max-tokens`` replayed
from a CUDA graph).  Reported: milliseconds, the speed-up over the float forward, and the fraction of
a roofline computed from the bytes each scheme actually reads -- the active experts' codes and scales
(bf16: their weights) -- and its FLOPs at the tensor-core rate of its activations (8-bit activations:
twice the bf16 matmul peak measured in the run, the ratio of Hopper's datasheet).  The relative error
of each quantized output against the float output is printed as a sanity check (quantization error,
not a kernel's: ``mojo-opset compare`` checks kernels against the exact reference).
"""
from __future__ import annotations

import gc
import time

from . import env as _env
from .table import fmt_num, render, wrap_lines


def _say(text: str) -> None:
    print("\n".join(wrap_lines(text)))


def parse_schemes(text: str) -> list[str]:
    from mojo_opset.quant import QUANT_SCHEMES

    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(QUANT_SCHEMES)
    bad = [n for n in names if n not in QUANT_SCHEMES]
    if bad or not names:
        raise ValueError(f"--quant: unknown scheme {bad[0] if bad else text!r}; expected some of "
                         f"{', '.join(QUANT_SCHEMES)} (or 'all')")
    return names


def quantize_chunked(w13, w2, scheme: str, chunk: int = 16):
    """``quantize_experts`` a few experts at a time (every scheme quantizes each expert on its own, so
    the result is the same) to bound the fp32 temporaries of large models."""
    import torch

    import mojo_opset as mo

    parts = [mo.quantize_experts(w13[e:e + chunk], w2[e:e + chunk], scheme) for e in range(0, w13.shape[0], chunk)]
    cat = [torch.cat([getattr(p, n) for p in parts]) for n in ("w13_q", "w13_scale", "w2_q", "w2_scale")]
    return mo.QuantizedExperts(scheme, *cat, group_size=parts[0].group_size)


def bytes_per_expert(q) -> int:
    return q.nbytes() // q.num_experts


def _time(fn, timer, device, graph: bool):
    from .bench_timing import capture_graph

    if graph:
        g = capture_graph(fn, device)
        t = timer(g.replay)
        del g
        return t, "graph"
    return timer(fn), "eager"


def run_quant(args, device, dtype, dname, backend, models, quick) -> int:
    import torch

    import mojo_opset as mo

    from .args import parse_list as _list
    from .bench_models import DEFAULT_TOKENS, QUICK_TOKENS, fit_to_memory, make_tokens, make_weights
    from .bench_timing import measure_peaks, timer_from_args, write_json
    from .served import served_call

    try:
        schemes = parse_schemes(args.quant)
    except ValueError as exc:
        _say(f"mojo-opset bench: {exc}")
        return 2
    tokens = _list(args.tokens, int) or list(QUICK_TOKENS if quick else DEFAULT_TOKENS)
    if quick:
        args.warmup, args.min_iters, args.max_iters, args.min_time = min(args.warmup, 1), 3, 10, 0.02
    use_graph = device.type == "cuda" and not args.no_graph
    timer = timer_from_args(args, device)
    dev_name, header = _env.run_header(device, backend)
    _say(f"mojo-opset bench --quant on {header}; activations {dname}; schemes {', '.join(schemes)}")
    peaks = measure_peaks(device, timer, quick)
    bw = args.peak_bw or peaks["measured"]["bandwidth_tbs"]
    tf = args.peak_tflops or peaks["measured"]["bf16_tflops"]
    _say(f"peaks measured: {bw:.3g} TB/s copy, {tf:.4g} TFLOP/s bf16 (8-bit activations: 2x)")

    results = []
    t0 = time.perf_counter()
    for model in models:
        model = fit_to_memory(model, dtype, device, (16 << 30) if max(tokens) >= 2048 else (8 << 30))
        w = make_weights(model, dtype, device, args.seed)
        xs = {T: make_tokens(model, T, dtype, device, args.seed) for T in tokens}
        float_bpe = model.weight_bytes(dtype, 1)
        base = {}
        for T in tokens:
            x = xs[T]
            ids, _ = mo.moe_gating(x, w.gate_weight, model.K, backend="torch", **w.routing)
            active = int(torch.unique(ids).numel())

            def fn(x=x):
                return mo.moe_forward(x, w.gate_weight, w.w13, w.w2, model.K, backend=backend, **w.routing)
            y_ref, served = served_call(fn, "moe_forward")
            t, mode = _time(fn, timer, device, use_graph and T <= args.graph_max_tokens)
            roof = max(active * float_bpe / (bw * 1e12), model.flops(T) / (tf * 1e12)) * 1e3
            base[T] = (t.ms, y_ref, active)
            results.append({"model": model.name, "experts": model.E, "T": T, "scheme": dname, "mode": mode,
                            "ms": t.ms, "bytes": active * float_bpe, "roofline_ms": roof,
                            "roofline_frac": roof / t.ms, "served_by": served.served_by})
        for scheme in schemes:
            try:
                q = quantize_chunked(w.w13, w.w2, scheme)
            except ValueError as exc:          # the model's sizes do not fit the scheme
                results += [{"model": model.name, "experts": model.E, "T": T, "scheme": scheme,
                             "error": f"not quantizable: {exc}"} for T in tokens]
                continue
            bpe = bytes_per_expert(q)
            peak = tf * (2 if q.info.activation else 1)
            for T in tokens:
                x = xs[T]

                def fn(x=x, q=q):
                    return mo.quant_moe_forward(x, w.gate_weight, q, model.K, backend=backend, **w.routing)
                rec = {"model": model.name, "experts": model.E, "T": T, "scheme": scheme}
                try:
                    y, served = served_call(fn, "quant_moe_forward")
                    t, mode = _time(fn, timer, device, use_graph and T <= args.graph_max_tokens)
                except Exception as exc:      # one failing point must not lose the run
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    results.append(rec)
                    continue
                ms0, y_ref, active = base[T]
                roof = max(active * bpe / (bw * 1e12), model.flops(T) / (peak * 1e12)) * 1e3
                err = float((y.float() - y_ref.float()).norm() / y_ref.float().norm().clamp_min(1e-30))
                rec.update(mode=mode, ms=t.ms, bytes=active * bpe, roofline_ms=roof, roofline_frac=roof / t.ms,
                           speedup=ms0 / t.ms, rel_err_vs_float=err, served_by=served.served_by,
                           reasons=list(served.reasons) if getattr(served, "reasons", None) else [])
                results.append(rec)
            del q
            gc.collect()
        del w, xs, base
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - t0
    print(render_quant(results, dname))
    for r in results:
        if "error" in r:
            _say(f"note: {r['model']} T={r['T']} {r['scheme']}: {r['error']}")
    print(f"{len(results)} measurements in {elapsed:.1f}s")
    if args.json:
        data = {"environment": _env.environment(device), "device_name": dev_name, "backend": backend,
                "dtype": dname, "schemes": schemes, "peaks": peaks, "results": results,
                "config": {"tokens": tokens, "graph_max_tokens": args.graph_max_tokens if use_graph else 0,
                           "flush_l2": not args.no_flush_l2}}
        write_json(args.json, data)
    return 0


def render_quant(results, dname: str) -> str:
    headers = ["model", "T", f"{dname} ms", "scheme", "ms", "speed-up", "of roofline", "rel err", "served"]
    rows = []
    floats = {(r["model"], r["T"]): r for r in results if r["scheme"] == dname}
    for r in results:
        if r["scheme"] == dname:
            continue
        f = floats.get((r["model"], r["T"]), {})
        g = " g" if r.get("mode") == "graph" else ""
        if "error" in r:
            rows.append([r["model"], r["T"], fmt_num(f.get("ms")), r["scheme"], "error", "-", "-", "-",
                         "see note"])
            continue
        rows.append([r["model"], r["T"], fmt_num(f.get("ms")) + g, r["scheme"], fmt_num(r["ms"]) + g,
                     f"{r['speedup']:.2f}x", f"{r['roofline_frac']:.2f}", f"{r['rel_err_vs_float']:.3f}",
                     r["served_by"]])
    title = ("quantized MoE forward vs the float forward on the same backend (ms; g = CUDA-graph replay; "
             "roofline = max(bytes the scheme reads / bandwidth, FLOPs / peak))")
    return "\n" + "\n".join(wrap_lines(title)) + "\n" + render(headers, rows)
