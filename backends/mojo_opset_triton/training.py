"""The training step of the fused routed experts: no host synchronisation, deterministic gradients.

Forward: the fused Triton forward with ``save_h`` (``forward.py``), or for wide experts the same
layer on ``torch._grouped_mm``; either way the only activation saved is the pre-activation
``h = x W13^T`` [T*K, 2I] in compact expert-sorted rows.

Backward, given ``out = sum_j w_j * swiglu(h) W2_e^T`` and ``dY = grad_out``, per pair p = (t, j):

1. ``G = dY_t W2_e``; SwiGLU backward ``dH = swiglu'(h) * (w G)`` written over ``h`` (its memory is
   reused: the backward runs once, a second one recomputes h); ``aw = w * a`` (the activation,
   recomputed); ``d w_p = <G, a>`` (``= <dY_t, a W2_e^T>``) summed from per-block partials in a
   fixed order.
2. ``dW2_e = sum_p dY_t^T aw_p``;  3. ``dX_p = dH_p W13_e`` and ``dx_t = sum_j dX_(t, j)`` in slot
   order, fp32 (no atomics);  4. ``dW13_e = sum_p dH_p^T x_t``.

The order keeps the peak low: every [T*K, *] buffer is freed before the next weight gradient is
allocated. Each GEMM runs on ``torch._grouped_mm`` (``gmm``: CUTLASS on Hopper, the faster engine
there for every model shape measured; the gathers and the SwiGLU epilogue then run as Triton
kernels) or on Triton kernels with the gathers and epilogues fused (``triton``: any dtype and GPU,
and the interpreter). ``MOJO_TRITON_TRAIN_GEMM`` overrides the choice (``triton``, ``gmm``, or
items such as ``fwd=triton,dact=gmm``). Weight gradients accumulate in fp32 and are stored in the
weights' dtype.
"""
from __future__ import annotations

import os

import torch

from . import train_kernel as tk
from .align_kernel import _gather_rows_kernel, align_pairs, gemm_rows
from .combine_kernel import combine, sum_pairs
from .configs import get_config
from .forward import compact_shift, fused_moe_forward, kernel_flags

STEPS = ("fwd", "dact", "dw2", "dw13", "dx")
GEMMS = STEPS[1:]
ENGINES = ("triton", "gmm")
WIDE_EXPERTS = 8192     # I from which the forward runs on torch._grouped_mm (CUTLASS is faster there)

# under the interpreter: one fixed config, tiles large enough to keep the number of programs low
INTERPRETER_WGRAD = {"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_R": 32, "num_warps": 4, "num_stages": 1}


def wgrad_config(x: torch.Tensor) -> dict:
    if x.device.type != "cuda":
        return INTERPRETER_WGRAD
    if x.dtype == torch.float32:
        return {"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_R": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_N": 128, "BLOCK_C": 128, "BLOCK_R": 64, "num_warps": 8, "num_stages": 3}


def gmm_available(x: torch.Tensor, H: int, I: int) -> bool:
    """``torch._grouped_mm`` runs here: CPU (any float), or CUDA bf16 on Hopper or newer; every
    operand's row stride (H, I, 2I elements) a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or (H * x.element_size()) % 16 or (I * x.element_size()) % 16:
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu"


def _parse_override(text: str) -> dict:
    text = text.strip().lower()
    if not text:
        return {}
    if text in ENGINES:
        return dict.fromkeys(STEPS, text)
    out = {}
    for item in text.split(","):
        step, _, engine = item.partition("=")
        step, engine = step.strip(), engine.strip()
        if step not in STEPS or engine not in ENGINES:
            raise ValueError(f"MOJO_TRITON_TRAIN_GEMM: expected 'triton', 'gmm' or items like 'dact=gmm' over "
                             f"{', '.join(STEPS)}; got {item!r}")
        out[step] = engine
    return out


def engines(x: torch.Tensor, T: int, E: int, H: int, I: int, K: int) -> dict:
    """The engine of the forward and of each backward GEMM for this shape."""
    if not gmm_available(x, H, I):
        return dict.fromkeys(STEPS, "triton")
    chosen = dict.fromkeys(GEMMS, "gmm" if x.device.type == "cuda" else "triton")
    chosen["fwd"] = "gmm" if x.device.type == "cuda" and I >= WIDE_EXPERTS else "triton"
    chosen.update(_parse_override(os.environ.get("MOJO_TRITON_TRAIN_GEMM", "")))
    return chosen


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, starting on 16 bytes (``torch._grouped_mm`` needs both)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _gather_rows(src, row_src, top_k):
    """out[r] = src[row_src[r] // K] (zeros where row_src < 0), contiguous [len(row_src), H]."""
    import triton

    R, H = row_src.shape[0], src.shape[1]
    out = torch.empty(R, H, dtype=src.dtype, device=src.device)
    if R and H:
        BH = min(1024, triton.next_power_of_2(H))
        _gather_rows_kernel[(R, triton.cdiv(H, BH))](src, src.stride(0), src.stride(1), row_src, out, H, top_k,
                                                    BH=BH, num_warps=4)
    return out


def forward(x, topk_ids, topk_weights, w13, w2, use=None):
    """The training forward: ``(out, h)``."""
    T, H = x.shape
    K = topk_ids.shape[1]
    E, I = w13.shape[0], w13.shape[1] // 2
    use = use or engines(x, T, E, H, I, K)
    if use["fwd"] == "triton" or T == 0:
        return fused_moe_forward(x, topk_ids, topk_weights, w13, w2, save_h=True)
    ids = topk_ids.to(torch.int32).contiguous()
    _, offs, crow_src, cpair_row, _ = align_pairs(ids, E, 1, T * K)
    xs = _gather_rows(x, crow_src, K)
    h = torch._grouped_mm(xs, _aligned(w13).transpose(1, 2), offs=offs)
    del xs
    a = tk.swiglu(h)
    y = torch._grouped_mm(a, _aligned(w2).transpose(1, 2), offs=offs)
    del a
    return combine(y, cpair_row, topk_weights, T), h


def fused_moe_backward(grad_out, x, topk_ids, topk_weights, w13, w2, h, cfg=None, use=None, wgrad_cfg=None):
    """(dx, d topk_weights, dw13, dw2) of the training forward; ``h`` is its second output and is
    overwritten (with dH).

    ``cfg``: the Triton row kernels' tiles (the forward's config by default); ``use``: the engine of
    each GEMM (``engines()`` by default); ``wgrad_cfg``: the Triton weight-gradient kernel's tiles."""
    T, H = x.shape
    K = topk_ids.shape[1]
    E, I = w13.shape[0], w13.shape[1] // 2
    P, dt, dev = T * K, x.dtype, x.device
    if T == 0:
        return (torch.zeros_like(x), torch.zeros_like(topk_weights), torch.zeros_like(w13), torch.zeros_like(w2))
    cfg = cfg or get_config(x, T, E, H, I, K)
    use = use or engines(x, T, E, H, I, K)
    wcfg = wgrad_cfg or wgrad_config(x)
    upcast, ieee = kernel_flags(x)
    x, go = x.contiguous(), grad_out.to(dt).contiguous()
    w13, w2 = _aligned(w13), _aligned(w2)
    ids = topk_ids.to(torch.int32).contiguous()
    wt = topk_weights.to(torch.float32).contiguous().view(-1)
    bm = cfg["BLOCK_M"]
    # the compact rows (every buffer), and the block-aligned tile table of the Triton row GEMMs
    _, offs, crow_src, cpair_row, _ = align_pairs(ids, E, 1, P)
    if "triton" in (use["dact"], use["dx"]):
        tpe, ends, row_src, _, block_expert = align_pairs(ids, E, bm, gemm_rows(P, E, bm), bm)
        shift = compact_shift(tpe, ends, bm)
    up_cfg, down_cfg = dict(cfg["up"], BLOCK_M=bm), dict(cfg["down"], BLOCK_M=bm)
    dh = h                                                  # dH is written over h

    # 1. through W2 and SwiGLU: dh, aw = w * a, and the partial sums of d topk_weights
    bn = up_cfg["BLOCK_N"]
    part = torch.zeros(P, -(-I // bn), dtype=torch.float32, device=dev)
    dy_rows = None
    if use["dact"] == "gmm":
        dy_rows = _gather_rows(go, crow_src, K)
        aw = torch._grouped_mm(dy_rows, w2, offs=offs)      # G, then w * a written over it
        tk.swiglu_grad(aw, h, wt, crow_src, dh, aw, part, bn)
    else:
        aw = torch.empty(P, I, dtype=dt, device=dev)
        tk.dact(go, w2, h, wt, row_src, block_expert, shift, dh, aw, part, K, up_cfg, upcast, ieee)
    d_weights = part.sum(dim=1).view(T, K).to(topk_weights.dtype)
    del part

    # 2. dW2 = dY^T (w a) per expert
    if use["dw2"] == "gmm":
        if dy_rows is None:
            dy_rows = _gather_rows(go, crow_src, K)
        dw2 = torch._grouped_mm(dy_rows.t(), aw, offs=offs)
    else:
        dw2 = torch.empty_like(w2)
        tk.wgrad(go, aw, dw2, offs, crow_src, K, True, False, wcfg, upcast, ieee)
    del dy_rows, aw

    # 3. dX = dH W13 per pair, summed over each token's slots in a fixed order
    if use["dx"] == "gmm":
        dx_rows = torch._grouped_mm(dh, w13, offs=offs)
        dx = combine(dx_rows, cpair_row, torch.ones(T, K, dtype=torch.float32, device=dev), T)
    elif K == 1:
        dx = torch.zeros(T, H, dtype=dt, device=dev)    # tokens whose id is out of range get zeros
        tk.dx_rows(dh, w13, dx, row_src, block_expert, shift, K, down_cfg, upcast, ieee, True)
    else:
        dx_rows = torch.empty(P, H, dtype=dt, device=dev)
        tk.dx_rows(dh, w13, dx_rows, row_src, block_expert, shift, K, down_cfg, upcast, ieee, False)
        dx = sum_pairs(dx_rows, ids, E, dt)
    dx_rows = None

    # 4. dW13 = dH^T X per expert
    if use["dw13"] == "gmm":
        dw13 = torch._grouped_mm(dh.t(), _gather_rows(x, crow_src, K), offs=offs)
    else:
        dw13 = torch.empty_like(w13)
        tk.wgrad(dh, x, dw13, offs, crow_src, K, False, True, wcfg, upcast, ieee)
    return dx, d_weights, dw13.to(w13.dtype), dw2.to(w2.dtype)
