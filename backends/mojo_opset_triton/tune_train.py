"""Time the training backward's engines and tile configs on this GPU.

    python -m mojo_opset_triton.tune_train                       # the bench's model shapes, T 4096 16384
    python -m mojo_opset_triton.tune_train --shapes qwen3 --tokens 4096 --json out.json

For each shape and token count, a training step (forward with ``save_h`` + backward, and the
forward alone) with every step on ``torch._grouped_mm``, on Triton, with one step at a time
switched to Triton, and with a few alternative tile configs of the Triton kernels; the engines
``training.engines()`` picks are recorded beside. Medians of CUDA-event timings with the L2
flushed (``triton.testing.do_bench``); each variant's outputs are checked against the all-gmm ones.
"""
from __future__ import annotations

import argparse
import json

import torch

from .configs import get_config
from .training import GEMMS, STEPS, engines, forward, fused_moe_backward, wgrad_config

SHAPES = {  # name: (H, I, E, K)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3": (2048, 768, 128, 8),
    "deepseek": (7168, 2048, 256, 8),
}
WGRAD_VARIANTS = [
    {"BLOCK_N": 128, "BLOCK_C": 128, "BLOCK_R": 32, "num_warps": 8, "num_stages": 4},
    {"BLOCK_N": 128, "BLOCK_C": 256, "BLOCK_R": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 256, "BLOCK_C": 128, "BLOCK_R": 32, "num_warps": 8, "num_stages": 3},
]


def make_case(name, T, seed=0):
    H, I, E, K = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.bfloat16

    def randn(*shape, std=1.0):
        return torch.empty(shape, device="cuda", dtype=dt).normal_(0, std, generator=g)

    x = randn(T, H)
    w13, w2 = randn(E, 2 * I, H, std=H ** -0.5), randn(E, H, I, std=I ** -0.5)
    ids = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices.to(torch.int32)
    w = torch.rand(T, K, device="cuda", generator=g)
    return x, ids, w, w13, w2, randn(T, H)


def _time(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=30, rep=150, return_mode="median")


def _rel(a, b):
    num = den = 0.0
    for u, v in zip(a.split(1), b.split(1)):      # slices: weight gradients can be tens of GB
        num += float((u.float() - v.float()).square().sum())
        den += float(v.float().square().sum())
    return (num / max(den, 1e-60)) ** 0.5


def _variants(cfg):
    """(label, engines, row-kernel config, weight-gradient config) to time."""
    gmm, tri = dict.fromkeys(STEPS, "gmm"), dict.fromkeys(STEPS, "triton")
    out = [("all gmm", gmm, cfg, None), ("all triton", tri, cfg, None), ("fwd=triton", dict(gmm, fwd="triton"), cfg,
                                                                        None)]
    for g in GEMMS:
        out.append((f"{g}=triton", dict(gmm, **{g: "triton"}), cfg, None))
    for i, wc in enumerate(WGRAD_VARIANTS):
        out.append((f"triton wgrad cfg {i}", tri, cfg, wc))
    alt = {"BLOCK_M": cfg["BLOCK_M"], "up": dict(cfg["up"], BLOCK_N=64 if cfg["up"]["BLOCK_N"] > 64 else 128),
           "down": dict(cfg["down"], BLOCK_N=64 if cfg["down"]["BLOCK_N"] > 64 else 128)}
    out.append(("triton rows BLOCK_N alt", tri, alt, None))
    return out


def tune_point(name, T):
    """Times of a training step (forward with save_h + backward) per variant."""
    x, ids, w, w13, w2, gy = make_case(name, T)
    H, I, E, K = SHAPES[name]
    cfg = get_config(x, T, E, H, I, K)
    rec = {"shape": name, "T": T, "config": cfg, "wgrad_config": wgrad_config(x), "default": engines(x, T, E, H, I, K),
           "variants": {}}
    base = None
    for label, use, c, wc in _variants(cfg):
        def step():
            out, h = forward(x, ids, w, w13, w2, use=use)
            return (out,) + fused_moe_backward(gy, x, ids, w, w13, w2, h, cfg=c, use=use, wgrad_cfg=wc)

        try:
            grads = step()
            if base is None:
                base = grads
            err = max(_rel(a, b) for a, b in zip(grads, base))
            del grads
            rec["variants"][label] = {"ms": _time(step), "rel_err_vs_all_gmm": err}
            rec["variants"][label]["fwd_ms"] = _time(lambda: forward(x, ids, w, w13, w2, use=use))
        except Exception as exc:  # a config out of resources on this GPU: report it, keep going
            rec["variants"][label] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            torch.cuda.synchronize()
        print(f"  {name} T={T} {label}: {rec['variants'][label]}", flush=True)
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tuning needs a CUDA GPU")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "points": []}
    import triton

    out["triton"] = triton.__version__
    print(f"{out['device']}; torch {out['torch']}, triton {out['triton']}", flush=True)
    for name in args.shapes:
        for T in args.tokens:
            out["points"].append(tune_point(name, T))
            torch.cuda.empty_cache()
    print("\nshape     T      fwd ms  " + "  ".join(f"{k[:14]:>14}" for k in out["points"][0]["variants"]))
    for p in out["points"]:
        cells = [f"{v['ms']:14.3f}" if "ms" in v else f"{'error':>14}" for v in p["variants"].values()]
        print(f"{p['shape']:<9} {p['T']:<6} {p['forward_ms']:6.3f}  " + "  ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
