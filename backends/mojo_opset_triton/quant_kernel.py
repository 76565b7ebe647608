"""Quantized fused grouped GEMMs of the MoE experts, over expert-sorted, block-aligned rows.

One kernel serves both projections (``UP``) of every scheme, the format chosen by constexprs:

* weights ``WFMT``: 0 int8 per output channel (the scale multiplies the accumulator columns in the
  epilogue), 1 int4 packed two per byte along K with per-(row, group) scales (each group's partial
  dot is scaled as it is added), 2 float8_e4m3 with 128x128 block scales (one block per K step,
  promoted into the fp32 accumulator per block, DeepSeek-V3's recipe);
* activations ``AFMT``: 0 the input dtype (weight-only schemes: codes are converted to it, exactly),
  1 int8 codes with a scale per row (int8 x int8 tensor-core dots accumulating int32), 2 float8_e4m3
  codes with a scale per row and 128 columns.  8-bit activations are quantized once, before the GEMM,
  by the row kernels of ``quant_act`` (quantizing A tiles inside the GEMM serialises a division per
  element behind each load and was measured 2-4x slower at decode sizes).

``UP``: A rows are gathered from x at ``pair // K``; gate and up columns accumulate side by side and
SwiGLU is applied in the epilogue (rounded to the activation dtype before and after, as the reference).
Otherwise: the down projection over the intermediate rows, with the router weight of each pair
applied in the epilogue, stored per pair (or per token when K == 1).

int4 codes become dot operands by bit tricks on packed words rather than a conversion per element
(``_int4_codes``; for 8-bit activations, 16x the codes as int8 with the 1/16 folded into the group scale).
int4: byte j of a row holds codes 2j (low nibble) and 2j+1 (high nibble), so a K step is two dots:
the even columns of A with the low nibbles and the odd columns with the high ones.  For int4 schemes
A is therefore kept *de-interleaved*: each row holds its even columns in ``[0, K/2)`` and its odd ones
in ``[K/2, K)`` (the row kernels write x that way, the up projection writes the intermediate that way),
so both halves are plain contiguous tiles.  A group (even size) never separates the two codes of a
byte; when a K step spans several groups, each group's dots see only its columns (A masked).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .experts_kernel import _row_sources, _tile_ids
from .pdl import chain_start, launch_options
from .platform import nvidia_ptx

W_INT8, W_INT4, W_FP8 = 0, 1, 2
A_FLOAT, A_INT8, A_FP8 = 0, 1, 2
# how int4 codes become dot operands (CODES_* below); None: the fastest the device supports.  Set to
# time the alternatives against each other.
CODES_OVERRIDE = None


@triton.jit
def _fdot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _dot(a, w, acc, IEEE: tl.constexpr, INT: tl.constexpr):
    """``acc + a @ w``: an int32 dot of 8-bit codes (``INT``), else a float dot."""
    if INT:
        out = tl.dot(a, w, acc, out_dtype=tl.int32)
    else:
        out = _fdot(a, w, acc, IEEE)
    return out


@triton.jit
def _load(ptrs, mask, FP8: tl.constexpr, ZERO: tl.constexpr):
    """A masked load; ``ZERO``: masked elements must read as zeros (a K tail).  Triton has no fp8
    ``other``, so fp8 then goes through its bytes (which keeps the load out of the pipeliner: only
    K tails take that path); masked columns and rows are never stored, so they may hold anything."""
    if FP8:
        if ZERO:
            v = tl.load(ptrs.to(tl.pointer_type(tl.uint8)), mask=mask, other=0).to(tl.float8e4nv, bitcast=True)
        else:
            v = tl.load(ptrs, mask=mask)
    else:
        v = tl.load(ptrs, mask=mask, other=0)
    return v


# PTX over 4 packed bytes (8 codes): the low and the high nibbles, each XOR 8, placed under the
# exponent byte of 128 (bf16: 0x43) or 1024 (fp16: 0x64), read 136 + code (1032 + code); one packed
# subtraction per pair makes them exact codes.  2 LOP3 + 1 shift + 4 PRMT + 4 packed subtractions per
# 8 codes: the decode K loop (sm_90) has 44% of the instructions of the per-element sign extension
# and conversion, and the int4 GEMMs at T <= 64 ran 1.2-2.3x faster on an H200.
_NIBBLES_PTX = """{
.reg .b32 t, u, e, c;
lop3.b32 t, $4, 0x0F0F0F0F, 0x08080808, 0x6a;
shr.b32 u, $4, 4;
lop3.b32 u, u, 0x0F0F0F0F, 0x08080808, 0x6a;
mov.b32 e, EXP;
mov.b32 c, BIAS;
prmt.b32 $0, t, e, 0x4140;
prmt.b32 $1, t, e, 0x4342;
prmt.b32 $2, u, e, 0x4140;
prmt.b32 $3, u, e, 0x4342;
sub.rn.TY $0, $0, c;
sub.rn.TY $1, $1, c;
sub.rn.TY $2, $2, c;
sub.rn.TY $3, $3, c;
}"""
_NIBBLES_BF16 = tl.constexpr(_NIBBLES_PTX.replace("EXP", "0x43434343").replace("BIAS", "0x43084308")
                             .replace("TY", "bf16x2"))
_NIBBLES_FP16 = tl.constexpr(_NIBBLES_PTX.replace("EXP", "0x64646464").replace("BIAS", "0x64086408")
                             .replace("TY", "f16x2"))
# 16x the codes as int8 (each nibble moved to the top of its byte, where it carries its sign)
_NIBBLES_I8 = tl.constexpr("""{
shl.b32 $0, $2, 4;
and.b32 $0, $0, 0xF0F0F0F0;
and.b32 $1, $2, 0xF0F0F0F0;
}""")
CODES_CONVERT, CODES_BITS, CODES_PTX = 0, 1, 2


@triton.jit
def _int4_codes(w, AFMT: tl.constexpr, DOT_DT: tl.constexpr, CODES: tl.constexpr):
    """(low, high) nibbles of the packed uint8 bytes ``w`` as the dot's operand: for 8-bit activations
    16x the codes as int8 (the caller scales by 1/16, exactly), else the codes in ``DOT_DT``.

    ``CODES``: CODES_CONVERT sign extension and conversion per element (fp32 dots; the interpreter's bf16),
    CODES_BITS the same bit tricks as the PTX per element (any device), CODES_PTX packed (NVIDIA)."""
    if CODES == 2:
        if AFMT != 0:
            lo, hi = tl.inline_asm_elementwise(_NIBBLES_I8, "=r,=r,r", [w], dtype=(tl.int8, tl.int8),
                                               is_pure=True, pack=4)
        elif DOT_DT == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(_NIBBLES_BF16, "=r,=r,=r,=r,r", [w],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(_NIBBLES_FP16, "=r,=r,=r,=r,r", [w],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    elif CODES == 1:
        if AFMT != 0:
            lo = (w << 4).to(tl.int8, bitcast=True)
            hi = (w & 0xF0).to(tl.int8, bitcast=True)
        else:
            BITS: tl.constexpr = 0x4308 if DOT_DT == tl.bfloat16 else 0x6408
            bias = tl.full(w.shape, BITS, tl.int16).to(DOT_DT, bitcast=True)
            lo = ((w & 0xF).to(tl.int16) ^ BITS).to(DOT_DT, bitcast=True) - bias
            hi = ((w >> 4).to(tl.int16) ^ BITS).to(DOT_DT, bitcast=True) - bias
    else:
        wi = w.to(tl.int8, bitcast=True)
        lo = (wi << 4) >> 4                         # arithmetic shifts sign-extend the nibbles
        hi = wi >> 4
        if AFMT == 0:
            lo = lo.to(DOT_DT)
            hi = hi.to(DOT_DT)
    return lo, hi


@triton.jit
def _int4_groups(acc, a_ev, a_od, lo, hi, s_ptrs, stride_sk, kstep, kw_left, mask_n,
                 AFMT: tl.constexpr, G: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                 CODES: tl.constexpr):
    """``acc += sum_g s[:, g] * (A_g @ W_g)`` over the groups of one K step (int4 codes lo/hi)."""
    INT: tl.constexpr = AFMT != 0
    ZERO: tl.constexpr = tl.int32 if INT else tl.float32
    if G >= BLOCK_K:
        s = tl.load(s_ptrs + ((kstep * BLOCK_K) // G) * stride_sk, mask=mask_n, other=0.0)
        if INT:
            if CODES != 0:
                s = s * 0.0625                              # the codes are 16x (_int4_codes)
        part = _dot(a_ev, lo, tl.zeros(acc.shape, dtype=ZERO), IEEE, INT)
        part = _dot(a_od, hi, part, IEEE, INT)
        acc += part.to(tl.float32) * s[None, :]
    else:
        grp = tl.arange(0, BLOCK_K // 2) // (G // 2)        # packed row j belongs to group j // (G/2)
        g0 = kstep * (BLOCK_K // G)
        for g in tl.static_range(BLOCK_K // G):
            # the scalar condition joins the block through a boolean block: Triton 3.9's interpreter
            # rejects a mask made by splatting a scalar comparison (the compiled code is the same)
            in_k = tl.zeros_like(mask_n) | ((g * (G // 2)) < kw_left)
            s = tl.load(s_ptrs + (g0 + g) * stride_sk, mask=mask_n & in_k, other=0.0)
            if INT:
                if CODES != 0:
                    s = s * 0.0625
            sel = (grp == g)[None, :]
            ae = tl.where(sel, a_ev, tl.zeros_like(a_ev))
            ao = tl.where(sel, a_od, tl.zeros_like(a_od))
            part = _dot(ae, lo, tl.zeros(acc.shape, dtype=ZERO), IEEE, INT)
            part = _dot(ao, hi, part, IEEE, INT)
            acc += part.to(tl.float32) * s[None, :]
    return acc


@triton.jit
def _mma(acc, a, a_ev, a_od, sa, w_ptrs, s_ptrs, stride_sk, kstep, kw_left, mask_n,
         WFMT: tl.constexpr, AFMT: tl.constexpr, G: tl.constexpr, BLOCK_K: tl.constexpr,
         EVEN_K: tl.constexpr, DOT_DT: tl.constexpr, IEEE: tl.constexpr, CODES: tl.constexpr):
    """``acc`` plus one K step of A @ W^T for one weight matrix (see the module docstring)."""
    PACK: tl.constexpr = 2 if WFMT == 1 else 1
    offs_kw = tl.arange(0, BLOCK_K // PACK)
    if EVEN_K:
        w = _load(w_ptrs, mask_n[None, :], WFMT == 2, False)
    else:
        w = _load(w_ptrs, (offs_kw < kw_left)[:, None] & mask_n[None, :], WFMT == 2, True)
    if WFMT == 0:
        if AFMT == 0:
            acc = _fdot(a, w.to(DOT_DT), acc, IEEE)
        else:
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    elif WFMT == 2:
        sw = tl.load(s_ptrs + kstep * stride_sk)
        acc += tl.dot(a, w) * sa[:, None] * sw
    else:
        lo, hi = _int4_codes(w, AFMT, DOT_DT, CODES)
        acc = _int4_groups(acc, a_ev, a_od, lo, hi, s_ptrs, stride_sk, kstep, kw_left, mask_n,
                           AFMT, G, BLOCK_K, IEEE, CODES)
    return acc


@triton.jit
def _dequant(acc, sa, s_ptrs, mask_n, WFMT: tl.constexpr, AFMT: tl.constexpr):
    """The fp32 GEMM result from the accumulator (int8 weights: the per-channel and per-row scales)."""
    y = acc
    if WFMT == 0:
        s = tl.load(s_ptrs, mask=mask_n, other=0.0)
        if AFMT == 1:
            y = acc.to(tl.float32) * sa[:, None] * s[None, :]
        else:
            y = acc * s[None, :]
    elif WFMT == 1:
        if AFMT == 1:
            y = acc * sa[:, None]
    return y


@triton.jit(do_not_specialize=["num_m"])
def _qgemm_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, out_ptr, row_src_ptr, block_expert_ptr, weight_ptr,
                  num_m, N, K, TOPK, E,
                  stride_am, stride_ak, stride_sam, stride_sak,
                  stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_om,
                  UP: tl.constexpr, PER_TOKEN: tl.constexpr, WFMT: tl.constexpr, AFMT: tl.constexpr,
                  G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_DT: tl.constexpr, IEEE: tl.constexpr,
                  CODES: tl.constexpr, PAIR_ROWS: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)
    PACK: tl.constexpr = 2 if WFMT == 1 else 1
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_ids(pid, num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if (e < 0) | (e >= E):
        return
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    src = _row_sources(row_src_ptr, offs_m, pid_m, BLOCK_M, PAIR_ROWS)
    valid_m = src >= 0
    if UP:
        rows = tl.where(valid_m, src // TOPK, 0).to(tl.int64)
    else:
        rows = offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    n64 = offs_n.to(tl.int64)
    offs_ka = tl.arange(0, BLOCK_K // PACK)     # A columns of one K step (per half for int4)
    e64 = e.to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_ka[None, :] * stride_ak
    KH = K // PACK                              # int4: the odd columns start here
    w_base = w_ptr + e64 * stride_we + offs_ka[:, None] * stride_wk
    w1_ptrs = w_base + n64[None, :] * stride_wn
    w3_ptrs = w_base + (n64 + N)[None, :] * stride_wn       # up rows follow the gate rows
    s_base = sw_ptr + e64 * stride_se
    if WFMT == 2:                                           # one 128-row block per column tile
        s1_ptrs = s_base + ((pid_n * BLOCK_N) // 128) * stride_sn
        s3_ptrs = s1_ptrs + (N // 128) * stride_sn
    else:
        s1_ptrs = s_base + n64 * stride_sn
        s3_ptrs = s_base + (n64 + N) * stride_sn
    sa = tl.zeros([BLOCK_M], dtype=tl.float32)
    if AFMT == 1:
        sa = tl.load(sa_ptr + rows * stride_sam)

    ACC_INT: tl.constexpr = (WFMT == 0) & (AFMT == 1)
    if ACC_INT:
        acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        acc3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kw_left = KH - k * (BLOCK_K // PACK)                # A columns (int4: per half) left
        if AFMT == 2:
            a = tl.load(a_ptrs)           # zero-padded to whole 128-column groups; invalid rows read row 0
            sa = tl.load(sa_ptr + rows * stride_sam + k * stride_sak)
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=valid_m[:, None], other=0)
        else:
            a = tl.load(a_ptrs, mask=valid_m[:, None] & (offs_ka < kw_left)[None, :], other=0)
        if WFMT == 1:
            a_ev = a
            if EVEN_K:
                a_od = tl.load(a_ptrs + KH * stride_ak, mask=valid_m[:, None], other=0)
            else:
                a_od = tl.load(a_ptrs + KH * stride_ak, mask=valid_m[:, None] & (offs_ka < kw_left)[None, :],
                               other=0)
            if AFMT == 0:
                a_ev = a_ev.to(DOT_DT)
                a_od = a_od.to(DOT_DT)
        else:
            a_od = a
            if AFMT == 0:
                a = a.to(DOT_DT)
            a_ev = a
        acc1 = _mma(acc1, a, a_ev, a_od, sa, w1_ptrs, s1_ptrs, stride_sk, k, kw_left, mask_n,
                    WFMT, AFMT, G, BLOCK_K, EVEN_K, DOT_DT, IEEE, CODES)
        if UP:
            acc3 = _mma(acc3, a, a_ev, a_od, sa, w3_ptrs, s3_ptrs, stride_sk, k, kw_left, mask_n,
                        WFMT, AFMT, G, BLOCK_K, EVEN_K, DOT_DT, IEEE, CODES)
        a_ptrs += (BLOCK_K // PACK) * stride_ak
        w1_ptrs += (BLOCK_K // PACK) * stride_wk
        w3_ptrs += (BLOCK_K // PACK) * stride_wk

    dt = out_ptr.dtype.element_ty
    y1 = _dequant(acc1, sa, s1_ptrs, mask_n, WFMT, AFMT).to(dt).to(tl.float32)
    if UP:
        up = _dequant(acc3, sa, s3_ptrs, mask_n, WFMT, AFMT).to(dt).to(tl.float32)
        act = y1 / (1.0 + tl.exp(-y1)) * up
        col = offs_n
        if WFMT == 1:                       # the down projection reads its A de-interleaved
            col = offs_n // 2 + (offs_n % 2) * (N // 2)
        tl.store(out_ptr + offs_m[:, None] * stride_om + col[None, :], act.to(dt), mask=mask_n[None, :])
    else:
        wt = tl.load(weight_ptr + src, mask=valid_m, other=0.0)
        y = y1 * wt[:, None]
        dst = src.to(tl.int64)
        if PER_TOKEN:
            dst = dst // TOPK
        tl.store(out_ptr + dst[:, None] * stride_om + offs_n[None, :], y.to(dt),
                 mask=valid_m[:, None] & mask_n[None, :])


def codes_mode(a, afmt: int, dot_dt) -> int:
    """How the int4 codes become dot operands: packed PTX on NVIDIA GPUs, the same bit tricks per
    element elsewhere (the interpreter), the per-element conversion for fp32 dots."""
    if CODES_OVERRIDE is not None:
        return CODES_OVERRIDE
    if afmt == A_FLOAT and dot_dt is tl.float32:
        return CODES_CONVERT
    if nvidia_ptx(a):
        return CODES_PTX
    return CODES_BITS


def launch(a, sa, w, sw, out, row_src, block_expert, weights_flat, *, up, per_token, top_k, N, K,
           wfmt, afmt, group, cfg, dot_dt, ieee, pair_rows=False, pdl=False):
    """One projection: ``a`` rows (x's dtype, or 8-bit codes with scales ``sa``; de-interleaved for
    int4) x the experts' quantized ``w``; ``pair_rows``: a row block per pair, ``block_expert`` the
    flat ids (see experts_kernel._row_sources); ``pdl``: a chained launch (pdl.py)."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    num_m = block_expert.numel()                  # one expert per row block
    if num_m == 0:
        return
    grid = (num_m * triton.cdiv(N, bn),)
    if sa is None:
        sa = sw                                   # unused: any pointer
    s_am = sa.stride(0) if sa.dim() >= 1 else 0
    s_ak = sa.stride(1) if sa.dim() == 2 else 0
    s_sk = sw.stride(2) if sw.dim() == 3 else 0
    _qgemm_kernel[grid](a, sa, w, sw, out, row_src, block_expert, weights_flat, num_m, N, K, top_k, w.shape[0],
                        a.stride(0), a.stride(1), s_am, s_ak,
                        w.stride(0), w.stride(1), w.stride(2), sw.stride(0), sw.stride(1), s_sk, out.stride(0),
                        UP=up, PER_TOKEN=per_token, WFMT=wfmt, AFMT=afmt, G=group or 128,
                        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], EVEN_K=K % bk == 0,
                        DOT_DT=dot_dt, IEEE=ieee, CODES=codes_mode(a, afmt, dot_dt), PAIR_ROWS=pair_rows,
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_options(pdl))
