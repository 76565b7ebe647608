"""Tune the quantized fused-experts configs on this GPU, per scheme and shape.

    python -m mojo_opset_triton.quant_tune                        # every scheme, the bench models
    python -m mojo_opset_triton.quant_tune --schemes w8a8_int8 --shapes qwen3 --tokens 1 64

For each scheme, model shape and token count it times the quantized routed-expert forward (given
routed ids) over a two-round local search (row block, tiles, K step, pipeline depth, warps) that starts from the
point's tuned config, else from :func:`quant_configs.heuristic` (T <= 256 replayed from a CUDA graph,
with ``tune.py``'s timer), and writes the fastest to ``configs/quant/<gpu>.json`` (merged with what is
there).  At T = 1 it then searches the one-token kernels' tiles (up, then down) and keeps them only when
they beat the tiled row blocks (``--gemv-only``: that search alone, from the table's tiled entry).
Weights are quantized a few experts at a time.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from mojo_opset.tools.bench_models import DEFAULT_MODELS, resolve

from .configs import gpu_file_name
from .quant_configs import (CONFIG_DIR, FORMATS, clear_cache, gemv_heuristic, heuristic, legalize, legalize_gemv,
                            shape_key)
from .quant_launch import gemv_served, quant_fused_moe_forward
from .tune import DEVICE, TOKENS, make_case, make_timer, time_ms


def candidates(base: dict, scheme: str, group, a_bytes: int) -> list[dict]:
    """The config and its neighbours: row block (both GEMMs), column tile, K step, pipeline depth, warps."""
    bm = base["BLOCK_M"]
    out = [base] + [dict(base, BLOCK_M=b) for b in (bm // 2, bm * 2) if 16 <= b <= 128]
    for gemm in ("up", "down"):
        c = base[gemm]
        for change in ({"BLOCK_N": max(16, c["BLOCK_N"] // 2)}, {"BLOCK_N": min(256, c["BLOCK_N"] * 2)},
                       {"BLOCK_K": c["BLOCK_K"] * 2}, {"BLOCK_K": max(32, c["BLOCK_K"] // 2)},
                       {"num_stages": c["num_stages"] + 1}, {"num_warps": 8 if c["num_warps"] == 4 else 4}):
            out.append(dict(base, **{gemm: dict(c, **change)}))
    uniq = {json.dumps(legalize(c, scheme, group, a_bytes), sort_keys=True) for c in out}
    return [json.loads(u) for u in sorted(uniq)]


def search(time_cfg, base: dict, scheme: str, group, a_bytes: int, rounds: int = 2):
    """Best (ms, config) of a local search: ``base`` and its neighbours, then the neighbours of the
    best so far (configs the compiler rejects are skipped)."""
    best, seen = None, set()
    for _ in range(rounds):
        start = best[1] if best else base
        for cfg in candidates(start, scheme, group, a_bytes):
            key = json.dumps(cfg, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            try:
                ms = time_cfg(cfg)
            except Exception as exc:   # a config the compiler rejects (resources)
                print(f"  skip {cfg}: {type(exc).__name__}")
                continue
            if best is None or ms < best[0]:
                best = (ms, cfg)
        if best is None or best[1] == start:
            break
    return best


def gemv_candidates(scheme: str, top_k: int) -> tuple[list, list]:
    """(BLOCK_N, BLOCK_K, warps) of the one-token kernels, up then down: up, 512-2048 codes per row and
    step over 2-16 rows; down, 2048-8192 products per step over all slots."""
    slots = 1 << max(0, (top_k - 1).bit_length())
    up = [(2, 1024, 4), (4, 512, 4), (4, 1024, 4), (8, 512, 4), (2, 2048, 4), (4, 2048, 8), (8, 1024, 8),
          (16, 512, 8)]
    down = [(bn, bk, w) for bk in (128, 256, 512, 1024) for w in (4, 8) for bn in (1, 2, 4, 8, 16)
            if slots * bn * bk in (2048, 4096, 8192)]
    return up, down


def tune_gemv(time_cfg, tiled: dict, scheme: str, group, top_k: int, H: int, I: int, log=print):
    """``(ms, config)``: ``tiled`` with the one-token kernels' best tiles (up, then down, then a
    pipeline depth pass), or with ``gemv`` None when the tiled row blocks stay faster."""
    base = dict(tiled, gemv=None)
    t_tiled = time_cfg(base)
    best = legalize_gemv(gemv_heuristic(scheme, H, I, top_k), scheme, group)
    t_best = float("inf")
    up_c, down_c = gemv_candidates(scheme, top_k)
    for which, cands in (("up", up_c), ("down", down_c)):
        passes = (lambda b: [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": 1} for n, k, w in cands],
                  lambda b: [dict(b, num_stages=2)])
        for tiles_of in passes:
            for c in tiles_of(best[which]):
                trial = legalize_gemv(dict(best, **{which: c}), scheme, group)
                try:
                    t = time_cfg(dict(tiled, gemv=trial))
                except Exception as exc:   # resources
                    log(f"  skip {which} {c}: {type(exc).__name__}")
                    continue
                if t < t_best:
                    t_best, best = t, trial
    log(f"  one-token kernels {t_best:.4g} ms, tiled {t_tiled:.4g} ms")
    return (t_best, dict(tiled, gemv=best)) if t_best < t_tiled else (t_tiled, base)


def quantize(w13, w2, scheme, chunk=16):
    from mojo_opset.tools.bench_quant import quantize_chunked

    return quantize_chunked(w13, w2, scheme, chunk)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schemes", nargs="+", default=list(FORMATS))
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    ap.add_argument("--out", help="output JSON (default: configs/quant/<gpu>.json)")
    ap.add_argument("--gemv-only", action="store_true",
                    help="T = 1: only the one-token kernels' search, from the table's tiled entry")
    args = ap.parse_args(argv)
    name = torch.cuda.get_device_name(DEVICE)
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    path = args.out or os.path.join(CONFIG_DIR, gpu_file_name(name))
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f).get("configs", {})
    timer = make_timer()
    dtype = torch.bfloat16
    for model in resolve(args.shapes):
        g = torch.Generator(device=DEVICE).manual_seed(0)
        w13 = torch.randn(model.E, 2 * model.I, model.H, device=DEVICE, dtype=dtype, generator=g) / model.H ** 0.5
        w2 = torch.randn(model.E, model.H, model.I, device=DEVICE, dtype=dtype, generator=g) / model.I ** 0.5
        for scheme in args.schemes:
            q = quantize(w13, w2, scheme)
            group = q.group_size if FORMATS[scheme][0] == "int4" else None
            key = shape_key(scheme, dtype, model.E, model.H, model.I, model.K, group)
            for T in args.tokens:
                x, ids, w = make_case(model, T)
                base = heuristic(scheme, T, model.E, model.H, model.I, model.K, group, dtype, sms)

                def time_cfg(cfg):
                    return time_ms(timer, lambda: quant_fused_moe_forward(
                        x, ids, w, scheme, q.w13_q, q.w13_scale, q.w2_q, q.w2_scale, q.group_size, cfg=cfg), T)

                # from the config already tuned for this point, if any (a re-tune refines it)
                tuned = table.get(key, {}).get(str(T))
                start = legalize(tuned, scheme, group, 2) if tuned else base
                one_token = T == 1 and gemv_served(scheme)
                if args.gemv_only and one_token:
                    best = (None, dict(start, gemv=None))
                else:
                    best = search(time_cfg, dict(start, gemv=None) if one_token else start, scheme, group, 2)
                    base_ms = time_cfg(dict(base, gemv=None) if one_token else base)
                    print(f"{scheme} {model.name} T={T}: heuristic {base_ms:.4g} ms, best {best[0]:.4g} ms",
                          flush=True)
                if one_token:
                    best = tune_gemv(time_cfg, best[1], scheme, group, model.K, model.H, model.I)
                    print(f"{scheme} {model.name} T=1: {best[0]:.4g} ms, gemv {best[1]['gemv']}", flush=True)
                table.setdefault(key, {})[str(T)] = best[1]
            del q
            _write(path, name, table)      # after each scheme: an interrupted run keeps what it tuned
    clear_cache()
    print(f"wrote {path}")
    return 0


def _write(path: str, device_name: str, table: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": device_name, "configs": table}, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    raise SystemExit(main())
