"""``mojo-opset bench --against LIB[,LIB]``: the bench's points through other libraries' fused MoE.

Each peer is an adapter from the library's public entry point to one call signature,
``experts(x, topk_ids, topk_weights) -> y``, over the bench's own weights (layout ``w13 [E, 2I, H]``,
gate rows then up rows, ``w2 [E, H, I]``: the layout all three libraries use).  Every path of this
table is given the same routing (the reference's ids and weights) and times the routed experts
only, so the comparison is of the expert computation; this library's own entry is the dispatched
``moe_forward`` op on the benchmarked backend.  A peer is checked against the reference at each
point before it is timed; a library that is not installed, or an entry point that is missing or
fails, is skipped with the reason.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

from .table import fmt_num, render

PART = "routed"
TOLERANCE = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 1e-4}   # relative error, L2 over the output


@dataclass
class Peer:
    name: str
    library: str                       # the importable module that must be present
    build: Callable                    # (w13, w2) -> experts(x, ids int32, weights fp32) -> y
    what: str


def _flaggems(w13, w2):
    import flag_gems

    fn = getattr(flag_gems, "fused_experts_impl", None)
    if fn is None:
        from flag_gems.fused import fused_experts_impl as fn
    return lambda x, ids, w: fn(x, w13, w2, w, ids)


def _vllm(w13, w2):
    from vllm.model_executor.layers.fused_moe import fused_experts

    return lambda x, ids, w: fused_experts(x, w13, w2, w, ids)


def _hf_grouped_mm(w13, w2):
    """An experts module of transformers' Qwen3-MoE (fused ``gate_up_proj`` / ``down_proj``) switched to
    its ``grouped_mm`` implementation, holding the bench's weights."""
    import torch
    from transformers.models.qwen3_moe import configuration_qwen3_moe as conf
    from transformers.models.qwen3_moe import modeling_qwen3_moe as model

    E, N, H = w13.shape
    cfg = conf.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=N // 2, num_experts=E, num_experts_per_tok=1)
    cfg._experts_implementation = "grouped_mm"
    experts = model.Qwen3MoeExperts(cfg).to(device=w13.device, dtype=w13.dtype)
    for name, t in (("gate_up_proj", w13), ("down_proj", w2)):
        p = getattr(experts, name)
        if tuple(p.shape) != tuple(t.shape):
            raise RuntimeError(f"transformers' {name} has shape {list(p.shape)}, expected {list(t.shape)}")
        setattr(experts, name, torch.nn.Parameter(t, requires_grad=False))
    return lambda x, ids, w: experts(x, ids.long(), w.to(x.dtype))


PEERS = {
    "flaggems": Peer("flaggems", "flag_gems", _flaggems, "FlagGems fused_experts_impl (Triton, default configs)"),
    "vllm": Peer("vllm", "vllm", _vllm, "vLLM fused_experts (Triton, its tuned configs where it ships them)"),
    "hf": Peer("hf", "transformers", _hf_grouped_mm, "transformers' experts with experts_implementation='grouped_mm'"),
}
ALIASES = {"flag_gems": "flaggems", "flag-gems": "flaggems", "transformers": "hf", "hf_grouped_mm": "hf",
           "huggingface": "hf"}


def resolve(text: str) -> list[Peer]:
    """Peers named in ``--against`` (comma-separated; ``all`` for every known peer)."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(PEERS.values())
    out = []
    for n in names:
        key = ALIASES.get(n, n)
        if key not in PEERS:
            raise ValueError(f"--against: unknown library {n!r}; known: {', '.join(PEERS)} (or all)")
        out.append(PEERS[key])
    return out


def available(peer: Peer) -> str | None:
    """None when the library imports, else the reason it is skipped."""
    try:
        importlib.import_module(peer.library)
    except Exception as exc:  # not installed, or broken: the run goes on without it
        return f"{peer.library} is not importable ({type(exc).__name__}: {exc})"
    return None


def relative_error(y, ref) -> float:
    d = (y.float() - ref.float()).norm().item()
    n = ref.float().norm().item()
    if not math.isfinite(d):
        return float("inf")
    return d / max(n, 1e-30)


def point_paths(peers: list[Peer], backend: str, x, w, K: int, dtype_name: str):
    """``({path: (callable, graph_capturable)}, {path: reason})`` for one (model, T) point: this
    library's routed experts and every peer that builds and matches the reference."""
    import mojo_opset as mo
    from mojo_opset.functional.forward import routed_experts

    ids, weights = mo.moe_gating(x, w.gate_weight, K, backend="torch", **w.routing)
    ref = routed_experts(x, ids, weights, (w.w13, w.w2), backend="torch")
    paths = {backend: (lambda: routed_experts(x, ids, weights, (w.w13, w.w2), backend=backend), True)}
    skipped = {}
    tol = TOLERANCE.get(dtype_name, 2e-2)
    for peer in peers:
        try:
            fn = peer.build(w.w13, w.w2)
            err = relative_error(fn(x, ids, weights), ref)
        except Exception as exc:  # an entry point that changed or fails here: skip, with the reason
            skipped[peer.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        if not err <= tol:
            skipped[peer.name] = f"wrong result: relative error {err:.3g} > {tol:g} against the reference"
            continue
        paths[peer.name] = (lambda fn=fn: fn(x, ids, weights), True)
    return paths, skipped


def best_peer(results, model: str, T: int, backend: str):
    """(peer name, record) of the fastest peer at a point (graph times where measured), or (None, None)."""
    from .bench_report import best_record

    best = (None, None)
    for path in dict.fromkeys(r["path"] for r in results if r["part"] == PART and r["path"] != backend):
        rec, _ = best_record(results, model, T, PART, path)
        if rec is not None and (best[1] is None or rec["ms"] < best[1]["ms"]):
            best = (path, rec)
    return best


def render_peers(results, backend: str, markdown: bool = False) -> str:
    """The routed-experts table: this library, each peer, and ``vs best peer`` = best peer ms / ours."""
    from .bench_report import best_record, measured_points

    paths = list(dict.fromkeys(r["path"] for r in results if r["part"] == PART))
    if not paths:
        return ""
    headers = ["model", "T"] + [f"{p} ms" for p in paths] + ["best peer", "vs best peer"]
    rows, ratios = [], []
    for model, E, ts in measured_points(results, PART):
        for T in ts:
            row = [f"{model} E{E}", T]
            for p in paths:
                rec, mode = best_record(results, model, T, PART, p)
                row.append(f"{fmt_num(rec['ms'])}{' g' if mode == 'graph' else ''}" if rec else "-")
            ours, _ = best_record(results, model, T, PART, backend)
            name, peer = best_peer(results, model, T, backend)
            row.append(name or "-")
            if ours and peer:
                ratios.append(peer["ms"] / ours["ms"])
                row.append(f"{ratios[-1]:.2f}x")
            else:
                row.append("-")
            rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
    ratios.sort()
    tail = ""
    if ratios:
        med = ratios[len(ratios) // 2] if len(ratios) % 2 else (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
        tail = (f"\n{backend} vs the best peer: median {med:.2f}x, lowest {ratios[0]:.2f}x, at least as fast at "
                f"{sum(r >= 1.0 for r in ratios)}/{len(ratios)} points")
    title = (f"\nrouted experts against other libraries (ms, the same routing for every path; g = CUDA graph; "
             f"vs best peer = the fastest peer's time / {backend}'s)")
    return title + "\n" + render(headers, rows, right={1}) + tail


def plot_peers(data: dict, path: str) -> None:
    """Time per path and point, one panel per model (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .bench_report import best_record, measured_points

    results = data["results"]
    models = measured_points(results, PART)
    if not models:
        return
    paths = list(dict.fromkeys(r["path"] for r in results if r["part"] == PART))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for col, (model, E, ts) in enumerate(models):
        ax = axes[0][col]
        for p in paths:
            recs = [best_record(results, model, T, PART, p)[0] for T in ts]
            ax.plot(ts, [r["ms"] if r else float("nan") for r in recs], marker="o", label=p)
        ax.set(xscale="log", yscale="log", title=f"{model} (E={E})", xlabel="tokens", ylabel="ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"routed experts against other libraries, {data['dtype']}, {data['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
