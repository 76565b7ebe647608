"""Tables and figures of ``mojo-opset bench`` from its measurement records (no measuring here)."""
from __future__ import annotations

from .table import fmt_num, render, wrap_lines

PARTS = ("gating", "permute", "experts", "combine")


def best_record(results, model, T, part, path):
    """(record, mode) of the timing of a path at a point (graph replay preferred when present)."""
    recs = [r for r in results if r["model"] == model and r["T"] == T and r["part"] == part and r["path"] == path
            and "ms" in r]
    graph = [r for r in recs if r["mode"] == "graph"]
    pick = graph or recs
    return (pick[0], pick[0]["mode"]) if pick else (None, None)


def measured_points(results, part="forward"):
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
    headers += ["of roofline", "vs grouped_mm"]
    rows = []
    for model, E, ts in measured_points(results):
        for T in ts:
            roof = next((r.get("roofline_ms") for r in results if r["model"] == model and r["T"] == T
                         and r["part"] == "forward" and "roofline_ms" in r), None)
            row = [f"{model}" + ("" if not E else f" E{E}"), T, fmt_num(roof)]
            best = {}
            for p in paths:
                rec, mode = best_record(results, model, T, "forward", p)
                best[p] = rec
                if rec is None:
                    err = next((r["error"] for r in results if r["model"] == model and r["T"] == T
                                and r["part"] == "forward" and r["path"] == p and "error" in r), "")
                    row.append("error" if err else "-")
                else:
                    flag = " g" if mode == "graph" else ""
                    fb = " (fallback)" if rec.get("reasons") else ""   # the op or one of its parts
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
    title = (f"MoE forward (ms; g = replayed from a CUDA graph; roofline = max(active expert weight bytes / "
             f"bandwidth, FLOPs / bf16 peak); of roofline and vs grouped_mm: {backend})")
    wrap = set(range(3, 3 + len(paths)))
    return "\n" + "\n".join(wrap_lines(title)) + "\n" + render(headers, rows, right={1, 2}, wrap=wrap)


def render_parts(results, backend: str) -> str:
    rows = []
    for part in PARTS:
        for model, E, ts in measured_points(results, part):
            for T in ts:
                cells = {}
                served = "-"
                for p in dict.fromkeys(r["path"] for r in results if r["part"] == part):
                    rec, mode = best_record(results, model, T, part, p)
                    if rec is not None:
                        cells[p] = f"{fmt_num(rec['ms'])}{' g' if mode == 'graph' else ''}"
                        if p == backend:
                            served = rec["served_by"]
                rows.append([part, f"{model} E{E}", T, cells.get(backend, "-"), cells.get("reference", "-"),
                             cells.get("grouped_mm", "-"), cells.get("loop", "-"), served])
    return "\nparts (ms)\n" + render(["part", "model", "T", backend, "reference", "grouped_mm", "loop", "served by"],
                                     rows)


def spec_summary(results, backend: str, graph_max: int) -> dict | None:
    """The headline figures: median and minimum fraction of the roofline over the points, and at
    how many points the backend beat the grouped_mm path (T <= graph_max compared from CUDA graphs
    where they were timed)."""
    fracs, wins, n_points = [], [], 0
    for model, _E, ts in measured_points(results):
        for T in ts:
            b, _ = best_record(results, model, T, "forward", backend)
            g, _ = best_record(results, model, T, "forward", "grouped_mm")
            if b is None or "roofline_frac" not in b:
                continue
            n_points += 1
            fracs.append(b["roofline_frac"])
            if g is not None:
                wins.append(b["ms"] < g["ms"])
    if not fracs:
        return None
    fracs_sorted = sorted(fracs)
    median = fracs_sorted[len(fracs) // 2] if len(fracs) % 2 else \
        (fracs_sorted[len(fracs) // 2 - 1] + fracs_sorted[len(fracs) // 2]) / 2
    out = {"points": n_points, "median_roofline_frac": median, "min_roofline_frac": fracs_sorted[0],
           "faster_than_grouped_mm": f"{sum(wins)}/{len(wins)}" if wins else "n/a"}
    out["text"] = (f"\n{backend}: median {median:.2f} of the roofline over {n_points} points (min "
                   f"{fracs_sorted[0]:.2f}); faster than grouped_mm at {out['faster_than_grouped_mm']} points")
    return out
