"""The quantized fused MoE forward: align -> quantized up GEMM (gather, SwiGLU) -> quantized down GEMM
(router weight) -> combine, reusing the bf16 path's align and combine kernels; no host synchronisation.

Also the quantized experts over rows already permuted by ``moe_permute`` (each row its own pair of
top-1 with weight 1, its expert found from the group ends on the device), and the reasons a call
cannot be served."""
from __future__ import annotations

import torch
import triton.language as tl

from mojo_opset.environ import env_int

from .pdl import pdl_on
from .platform import device_reason, nvidia_ptx
from .align_kernel import MAX_EXPERTS, row_blocks
from .combine_kernel import sum_pairs
from .configs import get_config
from .dequant_kernel import dequantize_experts
from .experts_kernel import down_proj, up_proj
from .forward import kernel_flags
from .quant_act_kernel import deinterleave_rows, quantize_rows_fp8, quantize_rows_int8
from .quant_configs import FORMATS, get_quant_config
from .quant_decode_kernel import gemv_scheme, quant_gemv
from .quant_kernel import A_FLOAT, A_FP8, A_INT8, W_FP8, W_INT4, W_INT8, launch

_W = {"int8": W_INT8, "int4": W_INT4, "fp8": W_FP8}
_A = {None: A_FLOAT, "int8": A_INT8, "fp8": A_FP8}
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_FLOATS = tuple(_TL)
MIN_INT4_GROUP = 16


def quant_reasons(x: torch.Tensor, scheme: str, group_size: int | None, num_experts: int) -> list[str]:
    """Why the kernels cannot serve a call (empty when they can); cheap, no device sync."""
    out = []
    r = device_reason(x)
    if r:
        out.append(r)
    if scheme not in FORMATS:
        out.append(f"scheme {scheme!r} has no kernel")
        return out
    if x.dtype not in _FLOATS:
        out.append(f"x dtype {str(x.dtype).replace('torch.', '')} is not served (bfloat16, float16, float32)")
    wf, _af = FORMATS[scheme]
    if wf == "fp8":
        if x.device.type == "cpu":
            out.append("float8_e4m3 is not supported by the Triton interpreter (fp8 runs on the GPU)")
        elif x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 9):
            out.append("float8_e4m3 tensor-core dots need compute capability 8.9 or newer")
    if wf == "int4":
        g = group_size or 128
        if g < MIN_INT4_GROUP or g & (g - 1):
            out.append(f"int4 group_size {g} is not served (powers of two >= {MIN_INT4_GROUP})")
    if num_experts > MAX_EXPERTS:
        out.append(f"E = {num_experts} experts is over the align kernel's limit of {MAX_EXPERTS}")
    return out


def _a_operand(a: torch.Tensor, afmt: int, deinterleave: bool, pdl: bool):
    """The GEMM's A: 8-bit codes and scales, or the float rows; int4 GEMMs read them de-interleaved
    (``deinterleave`` False: the rows already are)."""
    if afmt == A_INT8:
        return quantize_rows_int8(a, deinterleave, pdl)
    if afmt == A_FP8:
        return quantize_rows_fp8(a, pdl)
    return (deinterleave_rows(a, pdl) if deinterleave else a), None


# Chained launches (pdl.py) only for calls that stream few weight bytes, where the gaps between the
# launches (align, row quantizations, GEMMs, combine) are a visible part of the call: one H200,
# Qwen3-30B-A3B T = 1 (38 MB of 8-bit codes) 0.97-1.15x -> 1.05-1.14x of bf16, while chained calls
# streaming 350 MB ran slower (Mixtral-8x7B T = 1 w4a8_int4 0.133 -> 0.208 ms; cause not found).
CHAIN_MAX_BYTES = 64 << 20


def _streamed_bytes(w13_q, w2_q, active_experts: int) -> int:
    per_expert = (w13_q[0].numel() * w13_q.element_size() + w2_q[0].numel() * w2_q.element_size())
    return per_expert * active_experts


# Weight-only schemes from this many rows per expert (T * K / E, by weight format) on run the float
# kernels on weights dequantized a chunk of experts at a time (dequant_kernel.py): there the GEMMs are
# compute-bound and converting codes in front of every tensor-core instruction costs more than
# writing the weights once.  One H200, routed experts: int4 wins from 128 rows (Qwen3-30B-A3B T = 2048
# 1.29 -> 1.05 ms, T = 8192 3.75 -> 2.01; Mixtral-8x7B T = 8192 25.5 -> 11.9) and loses at 64
# (Mixtral-8x7B T = 256, DeepSeek-V3 T = 2048); int8 wins at 2048 (Mixtral-8x7B T = 8192 14.4 -> 11.9)
# and ties or loses at 512 (Qwen3-30B-A3B T = 8192, Mixtral-8x7B T = 2048).
DEQUANT_MIN_ROWS = {"int8": 2048, "int4": 128}
DEQUANT_MB = 1024       # MiB of dequantized weights held at once (MOJO_DEQUANT_MB; 0: never dequantize)


def dequant_budget() -> int:
    """Bytes of dequantized weights a call may hold (``MOJO_DEQUANT_MB``, default :data:`DEQUANT_MB`)."""
    return env_int("MOJO_DEQUANT_MB", DEQUANT_MB) << 20


def dequantize_first(scheme: str, T: int, E: int, K: int) -> bool:
    wf, af = FORMATS[scheme]
    return af is None and wf in DEQUANT_MIN_ROWS and T * K >= DEQUANT_MIN_ROWS[wf] * E and dequant_budget() > 0


def quant_fused_moe_forward(x, topk_ids, topk_weights, scheme, w13_q, w13_s, w2_q, w2_s, group_size, cfg=None):
    """Routed-expert output ``[T, H]`` in x's dtype for quantized experts (codes and scales as held by
    ``QuantizedExperts``); ids outside ``[0, E)`` contribute nothing.  ``cfg``: the quantized GEMMs'
    tiles (default: the tuned table; given, the quantized GEMMs serve the call at every size)."""
    T, H = x.shape
    K = topk_ids.shape[1]
    E, I = w13_q.shape[0], w13_q.shape[1] // 2
    if T == 0:
        return x.new_empty(0, H)
    wf, af = FORMATS[scheme]
    if cfg is None and dequantize_first(scheme, T, E, K):
        return dequantized_forward(x, topk_ids, topk_weights, wf, w13_q, w13_s, w2_q, w2_s, group_size)
    wfmt, afmt = _W[wf], _A[af]
    group = group_size if wf == "int4" else None
    cfg = cfg or get_quant_config(x, scheme, T, E, H, I, K, group)
    bm = cfg["BLOCK_M"]
    ids = topk_ids.to(torch.int32).contiguous()
    P = T * K
    if T == 1 and cfg.get("gemv") and gemv_ready(x, wfmt, afmt, w13_q, w2_q):
        return _decode_forward(x, ids, topk_weights, wfmt, afmt, w13_q, w13_s, w2_q, w2_s, group, cfg["gemv"])
    pair_rows = T == 1      # a row block per pair, no align launch
    pdl = pdl_on(x) and _streamed_bytes(w13_q, w2_q, min(E, P)) < CHAIN_MAX_BYTES
    R, row_src, block_expert, _, _ = row_blocks(ids, E, bm, pair_rows, pdl)
    upcast, ieee = kernel_flags(x)
    common = dict(top_k=K, wfmt=wfmt, afmt=afmt, group=group, dot_dt=tl.float32 if upcast else _TL[x.dtype],
                  ieee=ieee, pair_rows=pair_rows, pdl=pdl)
    int4 = wfmt == W_INT4

    a, sa = _a_operand(x, afmt, int4, pdl)
    inter = torch.empty(R, I, dtype=x.dtype, device=x.device)     # de-interleaved for int4
    launch(a, sa, w13_q, w13_s, inter, row_src, block_expert, row_src, up=True, per_token=False, N=I, K=H,
           cfg=dict(cfg["up"], BLOCK_M=bm), **common)

    a, sa = _a_operand(inter, afmt, False, pdl)
    w_flat = topk_weights.to(torch.float32).contiguous().view(-1)
    down = dict(cfg["down"], BLOCK_M=bm)
    if K == 1:
        out = torch.zeros(T, H, dtype=x.dtype, device=x.device)   # ids out of range leave zeros
        launch(a, sa, w2_q, w2_s, out, row_src, block_expert, w_flat, up=False, per_token=True, N=H, K=I,
               cfg=down, **common)
        return out
    y_pairs = torch.empty(P, H, dtype=x.dtype, device=x.device)
    launch(a, sa, w2_q, w2_s, y_pairs, row_src, block_expert, w_flat, up=False, per_token=False, N=H, K=I,
           cfg=down, **common)
    return sum_pairs(y_pairs, ids, E, x.dtype, pdl)


def gemv_served(scheme: str) -> bool:
    """Whether a one-token call of ``scheme`` may run on the matrix-vector kernels."""
    wf, af = FORMATS[scheme]
    return gemv_scheme(_W[wf], _A[af])


def gemv_ready(x, wfmt: int, afmt: int, w13_q, w2_q) -> bool:
    """Whether the one-token kernels (quant_decode_kernel.py) can read this call: a served scheme, rows
    contiguous along K, and for the 32-bit word loads of 8-bit activations K a multiple of 8, 16-byte
    aligned weights and their rows a whole number of words apart (w4a16_int4 reads bytes)."""
    if not gemv_scheme(wfmt, afmt) or x.stride(1) != 1 or w13_q.stride(2) != 1 or w2_q.stride(2) != 1:
        return False
    if afmt == A_INT8:
        H, I = x.shape[1], w2_q.shape[2] * (2 if wfmt == W_INT4 else 1)
        words = all(w.data_ptr() % 16 == 0 and w.stride(0) % 4 == 0 and w.stride(1) % 4 == 0 for w in (w13_q, w2_q))
        return H % 8 == 0 and I % 8 == 0 and words
    return True


def _decode_forward(x, ids, topk_weights, wfmt, afmt, w13_q, w13_s, w2_q, w2_s, group, gemv_cfg):
    """One token: an intermediate row per pair (matrix-vector kernels), its row quantization for 8-bit
    activations, then the down projection and the combine in one launch."""
    K, H, I = ids.shape[1], x.shape[1], w13_q.shape[1] // 2
    pdl = pdl_on(x)
    asm = nvidia_ptx(x)
    w_flat = topk_weights.to(torch.float32).contiguous().view(-1)
    common = dict(top_k=K, wfmt=wfmt, afmt=afmt, group=group, asm=asm, pdl=pdl)
    a, sa = _a_operand(x, afmt, wfmt == W_INT4, pdl)
    inter = torch.empty(K, I, dtype=x.dtype, device=x.device)     # de-interleaved for int4
    quant_gemv(a, sa, w13_q, w13_s, inter, ids, w_flat, up=True, N=I, K=H, cfg=gemv_cfg["up"], **common)
    a, sa = _a_operand(inter, afmt, False, pdl)
    out = torch.empty(1, H, dtype=x.dtype, device=x.device)
    quant_gemv(a, sa, w2_q, w2_s, out, ids, w_flat, up=False, N=H, K=I, cfg=gemv_cfg["down"], **common)
    return out


def dequantized_forward(x, topk_ids, topk_weights, wf, w13_q, w13_s, w2_q, w2_s, group_size):
    """The weight-only forward at many rows per expert: per chunk of experts, their weights
    dequantized to x's dtype (the reference's a16 weights bit for bit), then the float GEMMs on the
    chunk's row blocks (other experts' blocks remapped to -1, which the kernels skip); one combine."""
    T, H = x.shape
    K = topk_ids.shape[1]
    E, I = w13_q.shape[0], w13_q.shape[1] // 2
    cfg = get_config(x, T, E, H, I, K)
    bm = cfg["BLOCK_M"]
    ids = topk_ids.to(torch.int32).contiguous()
    w_flat = topk_weights.to(torch.float32).contiguous().view(-1)
    R, row_src, block_expert, _, _ = row_blocks(ids, E, bm, False)
    upcast, ieee = kernel_flags(x)
    step = max(1, min(E, dequant_budget() // (3 * H * I * x.element_size())))
    w13 = torch.empty(step, 2 * I, H, dtype=x.dtype, device=x.device)
    w2 = torch.empty(step, H, I, dtype=x.dtype, device=x.device)
    inter = torch.empty(R, I, dtype=x.dtype, device=x.device)
    y = torch.zeros(T, H, dtype=x.dtype, device=x.device) if K == 1 else torch.empty(T * K, H, dtype=x.dtype,
                                                                                    device=x.device)
    group = group_size if wf == "int4" else None
    for e0 in range(0, E, step):
        n = min(E, e0 + step) - e0
        dequantize_experts(w13_q[e0:e0 + n], w13_s[e0:e0 + n], wf, group, w13[:n])
        dequantize_experts(w2_q[e0:e0 + n], w2_s[e0:e0 + n], wf, group, w2[:n])
        be = block_expert if n == E else torch.where((block_expert >= e0) & (block_expert < e0 + n),
                                                     block_expert - e0, -1)
        up_proj(x, w13[:n], inter, row_src, be, K, dict(cfg["up"], BLOCK_M=bm), upcast, ieee)
        down_proj(inter, w2[:n], y, row_src, be, w_flat, K, dict(cfg["down"], BLOCK_M=bm), upcast, ieee, K == 1)
    return y if K == 1 else sum_pairs(y, ids, E, x.dtype, False)


def quant_experts_rows(permuted_x, group_ends, scheme, w13_q, w13_s, w2_q, w2_s, group_size):
    """The quantized experts on expert-sorted rows (``moe_quant_experts``): ``[R, H]``, zero past
    ``group_ends[-1]``.  Row r belongs to the expert whose group holds it; padding rows are zero rows,
    which every scheme maps to zero outputs."""
    R = permuted_x.shape[0]
    rows = torch.arange(R, dtype=torch.int32, device=permuted_x.device)
    expert = torch.searchsorted(group_ends.to(torch.int32).contiguous(), rows, right=True).to(torch.int32)
    ones = torch.ones(R, 1, dtype=torch.float32, device=permuted_x.device)
    return quant_fused_moe_forward(permuted_x, expert.unsqueeze(1), ones, scheme, w13_q, w13_s, w2_q, w2_s,
                                   group_size)
