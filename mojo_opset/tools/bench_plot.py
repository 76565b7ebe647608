"""``mojo-opset bench --plot``: time and fraction of the roofline per model (matplotlib, optional)."""
from __future__ import annotations

from .bench_report import best_record, measured_points


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, backend = data["results"], data["backend"]
    models = measured_points(results)
    if not models:
        raise ValueError("nothing to plot: no forward measurements")
    paths = list(dict.fromkeys(r["path"] for r in results if r["part"] == "forward"))
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 8), squeeze=False)
    for col, (model, E, ts) in enumerate(models):
        top, bottom = axes[0][col], axes[1][col]
        roof = []
        for T in ts:
            rec = next((r for r in results if r["model"] == model and r["T"] == T and r["part"] == "forward"
                        and "roofline_ms" in r), None)
            roof.append(rec["roofline_ms"] if rec else float("nan"))
        top.plot(ts, roof, "k--", label="roofline")
        for p in paths:
            best = [best_record(results, model, T, "forward", p)[0] for T in ts]
            ms = [b["ms"] if b else float("nan") for b in best]
            top.plot(ts, ms, marker="o", label=p)
            fr = [b.get("roofline_frac", float("nan")) if b else float("nan") for b in best]
            bottom.plot(ts, fr, marker="o", label=p)
        top.set(xscale="log", yscale="log", title=f"{model} (E={E})", xlabel="tokens", ylabel="ms")
        bottom.set(xscale="log", xlabel="tokens", ylabel="fraction of roofline")
        bottom.set_ylim(bottom=0)
        bottom.axhline(0.7, color="grey", lw=0.5)
        top.grid(True, which="both", alpha=0.3)
        bottom.grid(True, alpha=0.3)
        top.legend(fontsize="small")
    used = data["peaks"]["used"]
    fig.suptitle(f"MoE forward, {data['dtype']}, {data['device_name']}, backend {backend}\n"
                 f"roofline: {used['bandwidth_tbs']:.3g} TB/s, {used['bf16_tflops']:.4g} TFLOP/s (measured in the "
                 "run unless overridden); decode sizes from CUDA graphs where timed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
