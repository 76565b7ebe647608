"""``mojo-opset bench --train``: one training step of the routed-experts layer.

A step is: routing given (ids and weights from the reference router, the weights requiring grad),
permute, the two expert GEMMs with SwiGLU, combine; then the backward to x, w13, w2 and the routing
weights (``torch.autograd.grad`` with a random upstream gradient). Three paths in one run:

* ``<backend>``: the dispatched ``moe_forward`` op on routed tokens (``backend=<backend>``);
* ``torch``: the same op served by the core reference (what every backend falls back to);
* ``recipe``: the plain ``torch._grouped_mm`` autograd recipe (stable sort, gather, grouped GEMM,
  SwiGLU, grouped GEMM, router weight, scatter-add; everything differentiated by autograd).

Reported per point: median ms of a step, TFLOP/s (3x the forward's expert FLOPs), its fraction of
the bf16 matmul peak measured in the run, the step's peak memory above what was allocated before it
(the returned gradients included), and each path's gradient error against the reference.
"""
from __future__ import annotations

import gc
import sys
import time

from . import env as _env
from .table import fmt_num, render

TRAIN_TOKENS = (4096, 16384)
QUICK_TRAIN_TOKENS = (24,)
TRAIN_PATHS = ("backend", "torch", "recipe")


def recipe_layer(x, ids, weights, w13, w2):
    """The plain grouped-GEMM recipe (autograd does every gradient); no host synchronisation."""
    import torch
    import torch.nn.functional as F

    T, K = ids.shape
    E = w13.shape[0]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tok = order // K
    h = torch._grouped_mm(x[tok], w13.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    y = y * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tok, y)


def _layer_fns(backend: str):
    from mojo_opset.functional.forward import routed_experts

    return {"backend": lambda x, ids, w, w13, w2: routed_experts(x, ids, w, (w13, w2), backend=backend),
            "torch": lambda x, ids, w, w13, w2: routed_experts(x, ids, w, (w13, w2), backend="torch"),
            "recipe": recipe_layer}


def _step_fn(layer, x, ids, w, w13, w2, gy):
    import torch

    leaves = (x, w, w13, w2)

    def step():
        y = layer(x, ids, w, w13, w2)
        return torch.autograd.grad(y, leaves, gy)

    return step


def _peak_bytes(step, device) -> int | None:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    gc.collect()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def _served(step, path: str):
    """Run one step: its gradients, and what served the ``moe_forward`` op (the recipe calls none)."""
    import mojo_opset as mo

    mo.reset_stats()
    grads = step()
    rec = mo.last_served("moe_forward") if path != "recipe" else {}
    return grads, (rec.get("served_by", "-"), list(rec.get("reasons", ())))


def _rel(a, b) -> float:
    """|a - b| / |b| over slices of the first dim (weight gradients can be tens of GB)."""
    num = den = 0.0
    rows = max(1, (1 << 26) * max(1, a.shape[0]) // max(1, a.numel())) if a.dim() else 1
    for u, v in zip(a.reshape(a.shape[0] if a.dim() else 1, -1).split(rows),
                    b.reshape(b.shape[0] if b.dim() else 1, -1).split(rows)):
        u, v = u.float(), v.float()
        num += float((u - v).square().sum())
        den += float(v.square().sum())
    return (num / max(den, 1e-60)) ** 0.5


def _point(model, T, dtype, device, w, layers, timer, seed):
    """Measure every path at one (model, T); the torch path's gradients are the reference."""
    import torch

    import mojo_opset as mo

    from .bench_models import make_tokens

    x = make_tokens(model, T, dtype, device, seed).requires_grad_()
    with torch.no_grad():
        ids, weights = mo.moe_gating(x, w.gate_weight, model.K, backend="torch", **w.routing)
    weights = weights.detach().requires_grad_()
    g = torch.Generator(device=device).manual_seed(seed + 7)
    gy = torch.empty(T, model.H, dtype=dtype, device=device).normal_(0.0, 1.0, generator=g)
    flops = 3 * model.flops(T)
    recs, ref = [], None
    for path in sorted(layers, key=lambda p: p != "torch"):    # the reference first
        step = _step_fn(layers[path], x, ids, weights, w.w13, w.w2, gy)
        rec = {"model": model.name, "experts": model.E, "T": T, "path": path}
        try:
            grads, served = _served(step, path)
            if path == "torch":
                ref = grads
            if ref is not None:
                names = ("dx", "dweights", "dw13", "dw2")
                rec["grad_rel_err"] = {n: _rel(a, b) for n, a, b in zip(names, grads, ref)}
            del grads
            t = timer(step)
            rec.update(ms=t.ms, ms_min=t.ms_min, iters=t.iters, tflops=flops / (t.ms * 1e-3) / 1e12,
                       served_by=served[0], reasons=served[1])
            peak = _peak_bytes(step, device)
            if peak is not None:
                rec["peak_gib"] = peak / 2 ** 30
        except Exception as exc:  # one failing path must not hide the others
            rec["error"] = f"{type(exc).__name__}: {exc}"
        recs.append(rec)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return recs


def run_train(args, device, dtype, dname, backend, models, quick) -> int:
    """``mojo-opset bench --train`` (arguments already validated by ``bench.run``)."""
    import torch

    from .bench_timing import measure_peaks
    from .bench_models import fit_to_memory, make_weights
    from .bench_timing import timer_from_args, write_json
    from .progress import progress

    import mojo_opset as mo

    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else \
        list(QUICK_TRAIN_TOKENS if quick else TRAIN_TOKENS)
    if args.backend is None and device.type == "cpu" and mo.available_backends().get("triton", {}).get("available"):
        backend = "triton"      # interpreted on a CPU-only machine: the CI run of the kernels' code path
    if quick:
        args.warmup, args.min_iters, args.max_iters, args.min_time = 0, 1, 1, 0.0
    timer = timer_from_args(args, device)
    dev_name, header = _env.run_header(device, backend)
    print(f"mojo-opset bench --train on {header}; dtype {dname}")
    peaks = measure_peaks(device, timer, quick)
    peak_tf = args.peak_tflops or peaks["measured"]["bf16_tflops"]
    print(f"bf16 matmul peak measured: {peaks['measured']['bf16_tflops']:.4g} TFLOP/s")
    layers = _layer_fns(backend)
    if backend == "torch":
        layers.pop("backend")
    if not hasattr(torch, "_grouped_mm"):
        layers.pop("recipe")
    results, notes = [], []
    bar = progress(len(models) * len(tokens), "bench --train", enabled=not args.no_progress)
    t_start = time.perf_counter()
    for model in models:
        # weights, their gradients and the activations of the largest step must fit
        headroom = (24 << 30) if max(tokens) >= 4096 else (4 << 30)
        fitted = fit_to_memory(model, dtype, device, headroom + model.weight_bytes(dtype))
        if fitted is not model:
            notes.append(f"{model.name}: only {fitted.E} of {model.E} experts fit in free memory")
        model = fitted
        if model.note:
            notes.append(f"{model.name}: {model.note}")
        w = make_weights(model, dtype, device, args.seed)
        w.w13.requires_grad_()
        w.w2.requires_grad_()
        for T in tokens:
            bar.set_postfix_str(f"{model.name} T={T}")
            results += _point(model, T, dtype, device, w, layers, timer, args.seed)
            bar.update(1)
        del w
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    for r in results:
        if "tflops" in r:
            r["peak_frac"] = r["tflops"] / peak_tf
    for r in results:
        if r["path"] == "backend":
            r["path"] = backend
    paths = [p for p in dict.fromkeys(("recipe", "torch", backend)) if any(r["path"] == p for r in results)]
    print(render_train(results, backend, paths))
    for n in notes:
        print(f"note: {n}")
    errors = [r for r in results if "error" in r]
    for r in errors:
        print(f"error: {r['model']} T={r['T']} {r['path']}: {r['error']}", file=sys.stderr)
    print(f"{len(results)} measurements in {time.perf_counter() - t_start:.1f}s")
    data = {"environment": _env.environment(device), "device_name": dev_name, "backend": backend, "dtype": dname,
            "mode": "train", "peaks": peaks, "notes": notes,
            "config": {"models": [m.name for m in models], "tokens": tokens, "paths": paths, "quick": quick,
                       "flush_l2": not args.no_flush_l2},
            "results": results}
    if args.json:
        write_json(args.json, data)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(render_train(results, backend, paths, markdown=True) + "\n")
    if args.plot:
        try:
            plot_train(data, args.plot)
        except ImportError:
            print("--plot needs matplotlib (pip install 'mojo-opset[bench]')", file=sys.stderr)
            return 2
    return 1 if errors else 0


def _rec(results, model, T, path):
    return next((r for r in results if r["model"] == model and r["T"] == T and r["path"] == path), None)


def render_train(results, backend: str, paths, markdown: bool = False) -> str:
    headers = ["model", "T"] + [f"{p} ms" for p in paths] + [f"{backend} TFLOP/s", f"{backend} of peak",
                                                              f"{backend} vs recipe", "torch vs recipe"]
    headers += [f"{p} GiB" for p in paths] + [f"{backend} max grad err"]
    rows = []
    points = list(dict.fromkeys((r["model"], r["experts"], r["T"]) for r in results))
    for model, E, T in points:
        recs = {p: _rec(results, model, T, p) for p in paths}
        row = [f"{model} E{E}", T]
        row += [("error" if "error" in r else fmt_num(r["ms"])) if r else "-" for r in recs.values()]
        b, rc, tr = recs.get(backend), recs.get("recipe"), recs.get("torch")
        ok = lambda r: r is not None and "ms" in r  # noqa: E731
        row.append(f"{b['tflops']:.0f}" if ok(b) else "-")
        row.append(f"{b['peak_frac']:.2f}" if ok(b) and "peak_frac" in b else "-")
        row.append(f"{rc['ms'] / b['ms']:.2f}x" if ok(b) and ok(rc) else "-")
        row.append(f"{tr['ms'] / rc['ms']:.2f}x" if ok(tr) and ok(rc) else "-")
        row += [f"{r['peak_gib']:.2f}" if r and "peak_gib" in r else "-" for r in recs.values()]
        err = b.get("grad_rel_err") if b else None
        row.append(f"{max(err.values()):.1e}" if err else "-")
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        return "\n".join(lines)
    return ("\nTraining step of the routed experts (forward + backward; ms median; TFLOP/s = 3x forward FLOPs; "
            "GiB = peak above the memory allocated before the step; grad err = max over dx, d weights, dw13, "
            "dw2 of |g - g_torch| / |g_torch|)\n" + render(headers, rows))


def plot_train(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, paths = data["results"], data["config"]["paths"]
    models = list(dict.fromkeys((r["model"], r["experts"]) for r in results))
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for col, (model, E) in enumerate(models):
        ts = sorted({r["T"] for r in results if r["model"] == model})
        top, bottom = axes[0][col], axes[1][col]
        width = 0.8 / len(paths)
        for i, p in enumerate(paths):
            recs = [_rec(results, model, T, p) for T in ts]
            xs = [j + i * width for j in range(len(ts))]
            top.bar(xs, [r["ms"] if r and "ms" in r else 0 for r in recs], width, label=p)
            bottom.bar(xs, [r.get("peak_gib", 0) if r else 0 for r in recs], width, label=p)
        for ax, label in ((top, "ms per step"), (bottom, "peak GiB")):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ts))], [f"T={t}" for t in ts])
            ax.set(ylabel=label)
            ax.grid(True, axis="y", alpha=0.3)
        top.set_title(f"{model} (E={E})")
        top.legend(fontsize="small")
    fig.suptitle(f"Routed-experts training step, {data['dtype']}, {data['device_name']}, backend {data['backend']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
