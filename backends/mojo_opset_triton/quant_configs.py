"""Tile configurations of the quantized fused experts, keyed by scheme as well as shape.

A config is ``{"BLOCK_M": m, "up": {...}, "down": {...}}`` (each GEMM's dict: BLOCK_N, BLOCK_K,
GROUP_M, num_warps, num_stages); BLOCK_M is shared because both GEMMs walk the same rows.  One-token
configs also carry ``"gemv": {"up": {...}, "down": {...}}`` (BLOCK_N, BLOCK_K, num_warps, num_stages,
optional evict) for the matrix-vector kernels of quant_decode_kernel.py, or ``"gemv": None`` where the
tiled kernels stay faster.  Tuned
tables live in ``configs/quant/<gpu name>.json`` (``python -m mojo_opset_triton.quant_tune``) and map
``scheme/dtype/E.._H.._I.._K.._g..`` to configs per token count; a lookup takes the nearest token
count on a log scale; shapes without an entry use :func:`heuristic`.

Every config is passed through :func:`legalize`, which enforces what the kernels need: fp8 steps are
one 128-column block and column tiles divide 128; int4 steps hold whole bytes and a power-of-two
number of groups; 8-bit dots need K >= 32 per dot (int4 makes a step two half-K dots).
"""
from __future__ import annotations

import functools
import math
import os

import torch

from .configs import _device_info, load_table, nearest, row_tile

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs", "quant")

INTERPRETER = {"BLOCK_M": 16,
               "up": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 1},
               "down": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 1}}
INTERPRETER_GEMV = {"up": {"BLOCK_N": 4, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
                    "down": {"BLOCK_N": 4, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}}

# scheme -> (weight format, activation format or None)
FORMATS = {"w8a8_int8": ("int8", "int8"), "w4a8_int4": ("int4", "int8"), "w8a16_int8": ("int8", None),
           "w4a16_int4": ("int4", None), "w8a8_fp8_block": ("fp8", "fp8")}


def shape_key(scheme: str, dtype: torch.dtype, E: int, H: int, I: int, K: int, group: int | None) -> str:
    return f"{scheme}/{str(dtype).replace('torch.', '')}/E{E}_H{H}_I{I}_K{K}_g{group or 0}"


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def legalize_gemv(gemv: dict, scheme: str, group: int | None) -> dict:
    """The one-token tiles adjusted to their kernel: int4 steps lie in one group or hold whole groups
    (whole 32-bit words either way); int8 steps are whole words."""
    wf, _af = FORMATS[scheme]
    out = {}
    for name in ("up", "down"):
        c = dict(gemv[name])
        bk, bn = _pow2_floor(c["BLOCK_K"]), _pow2_floor(c["BLOCK_N"])
        if wf == "int4":        # in one group, or whole groups
            g = group or 128
            bk = max(16, min(bk, g)) if bk <= g else bk // g * g
        else:
            bk = max(16, bk)
        c["BLOCK_K"], c["BLOCK_N"] = bk, bn
        out[name] = c
    return out


def gemv_heuristic(scheme: str, H: int, I: int, K: int) -> dict:
    """One-token tiles: a few weight rows per program, about 1 KB of codes per row and step up, about
    4096 products per program and step down over all slots, 4 warps (the H200 searches' picks: up 2-8
    rows x 512-2048 columns, down 2048-4096 products, 4 warps at 10 of the 11 searched points)."""
    slots = 1 << max(0, (K - 1).bit_length())
    down_k = min(512, _pow2_floor(I))
    return {"up": {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1},
            "down": {"BLOCK_N": max(1, 4096 // (slots * down_k)), "BLOCK_K": down_k, "num_warps": 4,
                     "num_stages": 1}}


def legalize(cfg: dict, scheme: str, group: int | None, a_bytes: int) -> dict:
    """A copy of ``cfg`` adjusted to the kernels' constraints for ``scheme``."""
    wf, af = FORMATS[scheme]
    out = {"BLOCK_M": cfg["BLOCK_M"]}
    if cfg.get("gemv"):
        out["gemv"] = legalize_gemv(cfg["gemv"], scheme, group)
    elif "gemv" in cfg:
        out["gemv"] = None
    for name in ("up", "down"):
        c = dict(cfg[name])
        bk, bn = c["BLOCK_K"], c["BLOCK_N"]
        if wf == "fp8":
            bk = 128
            bn = min(128, _pow2_floor(bn))
        elif wf == "int4":
            lo = 64 if af == "int8" else 32          # each half-K dot needs 32 int8 / 16 half columns
            bk = max(lo, _pow2_floor(bk))
            g = group or 128
            if g < bk:
                bk = max(lo, min(bk, 8 * g))         # at most 8 groups unrolled per step
        elif af == "int8":
            bk = max(32, bk)
        elif a_bytes == 4:
            bk = min(bk, 64)
        c["BLOCK_K"], c["BLOCK_N"] = bk, bn
        out[name] = c
    return out


def heuristic(scheme: str, T: int, E: int, H: int, I: int, K: int, group: int | None,
              dtype: torch.dtype, num_sms: int = 132) -> dict:
    """Defaults by rows per active expert.  Decode sizes stream the weights: thin row blocks, wide K
    steps (bytes in flight), narrow column tiles when there would be too few programs; large sizes
    are compute-bound: 128-row tiles (the up GEMM's two accumulators on 64 columns each)."""
    wf, af = FORMATS[scheme]
    active, m, (bm, warps, stages, gm) = row_tile(T, E, K)
    decode = bm <= 32
    if wf == "fp8" or af == "int8" or (wf == "int4" and dtype != torch.float32):
        # int4: a 128-column step is 64 bytes per weight row; at large sizes 64-column steps ran
        # 1.3-1.5x slower (H200, bf16, the tuner's runs: everything else equal)
        bk = 128
    else:
        bk = 128 if decode else 64
    if wf == "int4" and decode:
        stages = 5          # half the bytes per K step of int8: a deeper pipeline keeps as many in flight
    if dtype == torch.float32:
        stages = min(stages, 2)

    def gemm(n_out: int, up: bool) -> dict:
        # the up GEMM holds two accumulators (gate, up): half the columns keep it in registers
        bn = 64 if m <= 96 or up else 128
        if decode and active * math.ceil(n_out / bn) < 2 * num_sms:
            bn = 32
        return {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": warps, "num_stages": stages}

    cfg = {"BLOCK_M": bm, "up": gemm(I, True), "down": gemm(H, False)}
    return legalize(cfg, scheme, group, torch.empty((), dtype=dtype).element_size())


@functools.lru_cache(maxsize=4096)
def _lookup(device_name: str, num_sms: int, scheme: str, T: int, E: int, H: int, I: int, K: int,
            group: int | None, dtype: torch.dtype) -> dict:
    hit = nearest(load_table(CONFIG_DIR, device_name).get(shape_key(scheme, dtype, E, H, I, K, group), {}), T)
    if hit is not None:
        cfg = legalize(hit, scheme, group, torch.empty((), dtype=dtype).element_size())
    else:
        cfg = heuristic(scheme, T, E, H, I, K, group, dtype, num_sms)
    if T == 1 and "gemv" not in cfg:     # one token: the matrix-vector kernels' tiles
        cfg = dict(cfg, gemv=legalize_gemv(gemv_heuristic(scheme, H, I, K), scheme, group))
    return cfg


def get_quant_config(x: torch.Tensor, scheme: str, T: int, E: int, H: int, I: int, K: int,
                     group: int | None) -> dict:
    if x.device.type != "cuda":
        gemv = INTERPRETER_GEMV if T == 1 else None
        return legalize(dict(INTERPRETER, gemv=gemv), scheme, group, x.element_size())
    name, sms = _device_info(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return _lookup(name, sms, scheme, T, E, H, I, K, group, x.dtype)


def clear_cache() -> None:
    load_table.cache_clear()
    _lookup.cache_clear()
