"""Tile configurations of the fused experts: tuned JSON per GPU name, else per-shape heuristics.

A config is ``{"BLOCK_M": m, "up": {...}, "down": {...}}`` where each GEMM's dict holds
BLOCK_N, BLOCK_K, GROUP_M, num_warps and num_stages; BLOCK_M is shared because both GEMMs walk the
same block-aligned rows.  Tuned files live in ``configs/<gpu name>.json`` (written by
``python -m mojo_opset_triton.tune``) and map a shape key to configs per token count; a lookup
takes the entry with the nearest token count (on a log scale).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re

import torch
import triton

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")

# one fixed, small config under the interpreter (no autotuning, quick on CPU)
INTERPRETER = {"BLOCK_M": 16,
               "up": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 1},
               "down": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 1},
               "gemv": {"up": {"BLOCK_N": 4, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
                        "down": {"BLOCK_N": 4, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}}}


def gpu_file_name(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


def shape_key(dtype: torch.dtype, E: int, H: int, I: int, K: int) -> str:
    return f"{str(dtype).replace('torch.', '')}/E{E}_H{H}_I{I}_K{K}"


@functools.lru_cache(maxsize=None)
def load_table(config_dir: str, device_name: str) -> dict:
    """The ``configs`` of ``<config_dir>/<gpu>.json`` (empty when there is no readable file)."""
    path = os.path.join(config_dir, gpu_file_name(device_name))
    try:
        with open(path) as f:
            return json.load(f).get("configs", {})
    except (OSError, ValueError):
        return {}


HOPPER_SMEM = 232448      # opt-in shared memory per block of an H100/H200


def row_tile(T: int, E: int, K: int):
    """``(active experts, rows per active expert m, (BLOCK_M, num_warps, num_stages, GROUP_M))``: thin
    row blocks for decode sizes, 128-row tiles when compute-bound (shared by the bf16 and quantized
    heuristics).  BLOCK_M stays near twice m: with m rows on average many experts get more, and an
    expert whose rows spill into a second block streams its weights twice."""
    pairs = T * K
    active = max(1, min(E, pairs))
    m = pairs / active
    if m <= 10:
        tile = 16, 4, 4, 1
    elif m <= 24:
        tile = 32, 4, 4, 1
    elif m <= 48:
        tile = 64, 4, 4, 8
    else:
        tile = 128, 8, 3, 8
    return active, m, tile


def _gemm(bn: int, bk: int, gm: int, warps: int, stages: int) -> dict:
    return {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": warps, "num_stages": stages}


def heuristic(T: int, E: int, H: int, I: int, K: int, dtype: torch.dtype, num_sms: int = 132,
              smem_bytes: int = HOPPER_SMEM) -> dict:
    """Defaults by rows per active expert (fitted to tuned H100/H200 tables).  Decode sizes stream
    the weights: wide K steps keep bytes in flight, wide column tiles when the intermediate size
    gives enough programs; compute-bound sizes take 128x128 up and 128x256 down tiles.  Pipelines
    are then made shallow enough for the GPU's shared memory (``smem_bytes`` per block)."""
    return fit_shared_memory(_tiles(T, E, I, K, dtype), torch.empty((), dtype=dtype).element_size(), smem_bytes)


def fit_shared_memory(cfg: dict, elt: int, smem_bytes: int) -> dict:
    """Fewer pipeline stages (then shorter K steps) until each GEMM's buffers fit in shared memory:
    per stage a BLOCK_M x BLOCK_K activation tile and one (down) or two (up: gate and up) weight tiles."""
    bm = cfg["BLOCK_M"]
    out = {"BLOCK_M": bm}
    for name, tiles in (("up", 2), ("down", 1)):
        c = dict(cfg[name])
        def need(c=c):
            return c["num_stages"] * (bm + tiles * c["BLOCK_N"]) * c["BLOCK_K"] * elt
        while need() > smem_bytes and c["num_stages"] > 2:
            c["num_stages"] -= 1
        while need() > smem_bytes and c["BLOCK_K"] > 32:
            c["BLOCK_K"] //= 2
        out[name] = c
    return out


def _tiles(T: int, E: int, I: int, K: int, dtype: torch.dtype) -> dict:
    active, m, (bm, warps, stages, gm) = row_tile(T, E, K)
    if dtype == torch.float32:      # 4-byte operands: short K steps, shallow pipelines
        return {"BLOCK_M": bm, "up": _gemm(64 if bm < 128 else 128, 32, gm, warps, 2),
                "down": _gemm(64 if bm < 128 else 128, 32, gm, warps, 2)}
    wide = I >= 2048
    if bm == 128:
        up = _gemm(128, 64, gm, 8, 3 if T >= 4096 else 4)
        down = _gemm(256, 64, gm, 8, 3)
    elif bm == 64:
        up = down = _gemm(64, 64, gm, 4, 4)
    elif bm == 32:
        up = _gemm(128, 128, gm, 4, 3) if wide else _gemm(64, 64, gm, 4, 5)
        down = _gemm(128, 128, gm, 4, 3)
    else:
        up = _gemm(128, 128, gm, 4, 3) if wide else _gemm(32, 256, gm, 4, 3)
        down = _gemm(64, 256, gm, 4, 3) if I >= 8192 else _gemm(64, 128, gm, 4, 4)
    return {"BLOCK_M": bm, "up": up, "down": down}


def gemv_heuristic(H: int, I: int, K: int, dtype: torch.dtype) -> dict:
    """Tiles of the one-token kernels (decode_kernel.py), fitted to the H200 searches: up, 4 weight
    rows by 512 columns per program; down, 8 warps with about 8 partial sums per thread over all
    slots (2048 products per program), 256-column steps when the intermediate size allows."""
    slots = triton.next_power_of_2(K)
    bk = min(256 if I >= 2048 else 128, triton.next_power_of_2(I))
    return {"up": {"BLOCK_N": 4, "BLOCK_K": min(512, triton.next_power_of_2(H)), "num_warps": 4, "num_stages": 1},
            "down": {"BLOCK_N": max(1, 2048 // (slots * bk)), "BLOCK_K": bk, "num_warps": 8, "num_stages": 1}}


def nearest(entries: dict, T: int):
    """The entry whose token count is nearest to T on a log scale (None when empty)."""
    best, best_d = None, None
    for k, v in entries.items():
        d = abs(math.log(max(int(k), 1)) - math.log(max(T, 1)))
        if best_d is None or d < best_d:
            best, best_d = v, d
    return best


@functools.lru_cache(maxsize=4096)
def _lookup(device_name: str, num_sms: int, T: int, E: int, H: int, I: int, K: int, dtype: torch.dtype) -> dict:
    hit = nearest(load_table(CONFIG_DIR, device_name).get(shape_key(dtype, E, H, I, K), {}), T)
    cfg = hit if hit is not None else heuristic(T, E, H, I, K, dtype, num_sms, _smem(device_name))
    if T == 1 and "gemv" not in cfg:     # one token: the matrix-vector kernels' tiles
        cfg = dict(cfg, gemv=gemv_heuristic(H, I, K, dtype))
    return cfg


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(index)
    _SMEM[props.name] = getattr(props, "shared_memory_per_block_optin", 0) or HOPPER_SMEM
    return props.name, props.multi_processor_count


_SMEM: dict[str, int] = {}


def _smem(device_name: str) -> int:
    return _SMEM.get(device_name, HOPPER_SMEM)


# The deterministic mode's one configuration for every token count: a tile shape, warp count and
# pipeline depth fix the order in which each output element's products are summed (and which matrix
# instruction sums them), so a row's bits then depend on that row alone; no split-K anywhere.
DETERMINISTIC = {"BLOCK_M": 64,
                 "up": {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
                 "down": {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}}
DETERMINISTIC_FP32 = {"BLOCK_M": 64,
                      "up": {"BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2},
                      "down": {"BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}}


def deterministic_config(x: torch.Tensor) -> dict:
    """The tile configuration of the deterministic mode: the same whatever the token count."""
    if x.device.type != "cuda":
        return INTERPRETER
    return DETERMINISTIC_FP32 if x.dtype == torch.float32 else DETERMINISTIC


def get_config(x: torch.Tensor, T: int, E: int, H: int, I: int, K: int) -> dict:
    if x.device.type != "cuda":
        return INTERPRETER
    name, sms = _device_info(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return _lookup(name, sms, T, E, H, I, K, x.dtype)


def clear_cache() -> None:
    load_table.cache_clear()
    _lookup.cache_clear()
