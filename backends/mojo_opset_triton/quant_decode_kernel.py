"""One-token quantized experts as matrix-vector products (decode), the quantized twin of decode_kernel.py.

At T = 1 the tiled quantized GEMMs pad each pair's single row to a 16-row tensor-core tile and stream
each expert's codes through a few hundred programs; here thousands of small programs each multiply a
few weight rows by the pair's row on the CUDA cores, so every SM keeps streaming codes.

One kernel serves both projections over a "slot" axis ``S``:

* ``UP``: program (pair p, column block); slot 0 the gate rows ``n``, slot 1 the up rows ``n + N`` of
  expert ``ids[p]``, both times x's row ``p // TOPK``; SwiGLU in the epilogue, one intermediate row per
  pair (de-interleaved for int4 weights, as the down projection's activations are read).
* down: program (token t, column block); slot j the pair ``t * TOPK + j`` (its expert's rows ``n``
  times its intermediate row), then the combine in the same program (the tiled path's roundings:
  GEMM output rounded to the dtype, times the router weight, rounded, summed over the slots in fp32).

Per scheme (``WFMT``/``AFMT`` as in quant_kernel.py):

* w8a16_int8: codes (made fp32 by byte permutes on NVIDIA GPUs) times the activations in fp32, the
  channel scale on the row sums;
* w8a8_int8: 8-bit activation codes and weight codes read as 32-bit words, four products per
  ``dp4a`` into int32 (exact, as the reference's integer sums), then ``acc * s_x * s_w``;
* w4a8_int4: the packed nibbles moved to the top of their bytes (16x the codes, as int8), one ``dp4a``
  per word for the even and one for the odd columns of the de-interleaved activations; a K step lies
  in one group (its scale / 16 multiplies the step's word sums) or holds whole groups (each group's
  exact sum times its scale / 16);
* w4a16_int4: the codes read as bytes (byte j: codes 2j and 2j + 1, whose activations are the
  de-interleaved columns j and K/2 + j, read as two contiguous rows), each byte's low and high code
  made fp32 by byte permutes, times its two activations in fp32; groups as w4a8_int4 (without the 16).
  Reading words (8 codes) gathered each word's 8 activations one by one through shared memory: on an
  H200 the byte form runs Mixtral-8x7B's up / down projections in 51 / 40 µs instead of 58 / 51 µs
  (each with its best tiles).

w8a8_fp8_block stays on the tiled kernels: converting its codes on the CUDA cores cost more than the
padded tensor-core tile (on an H200: 0.177 against 0.137 ms for Mixtral-8x7B's routed experts).

Slots whose expert id is outside ``[0, E)`` contribute nothing.  ``ASM`` / ``CVT`` False (the
interpreter): ``dp4a`` as shifts and integer products (the same integers), the codes converted per
element (the same values).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .pdl import chain_start, launch_options
from .quant_kernel import A_FLOAT, A_INT8, W_INT4, W_INT8

# the high nibble of each byte of a word (0xF0F0F0F0 as int32)
_HIGH_NIBBLES = tl.constexpr(-252645136)


def _permutes_to_f32(words: list[str], bias: str) -> str:
    """PTX placing each byte of the ``words`` registers (code + bias, 0..255) under the exponent byte of
    2**23 by a byte permute, then subtracting 2**23 + bias (the float ``bias``): the exact codes, into
    the outputs $0, $1, ... in order."""
    temps = [f"t{i}" for i in range(4 * len(words))]
    lines = [f".reg .b32 b, {', '.join(temps)};", "mov.b32 b, 0x4B000000;"]
    lines += [f"prmt.b32 t{4 * j + i}, {w}, b, 0x744{i};" for j, w in enumerate(words) for i in range(4)]
    lines += [f"sub.f32 ${i}, {t}, {bias};" for i, t in enumerate(temps)]
    return "\n".join(lines)


# int8 codes -> fp32 on the integer and float pipes (I2F runs at a quarter of their rate): each byte
# XOR 0x80 (code + 128) placed under the exponent byte of 2**23 by a byte permute reads 2**23 + 128 +
# code; one subtraction makes it the exact code
_CODES_F32 = tl.constexpr("{\n.reg .b32 u;\nxor.b32 u, $4, 0x80808080;\n"
                          + _permutes_to_f32(["u"], "0f4B000080") + "\n}")


def _nibbles_to_f32(high: bool) -> str:
    """PTX: the low (``high``: the high) int4 code of each of a register's 4 bytes -> fp32 the same way,
    the nibble XOR 8 (code + 8) under the exponent byte, minus 2**23 + 8."""
    nibble = "shr.b32 u, $4, 4;\nand.b32 u, u, 0x0F0F0F0F;\n" if high else "and.b32 u, $4, 0x0F0F0F0F;\n"
    return ("{\n.reg .b32 u;\n" + nibble + "xor.b32 u, u, 0x08080808;\n"
            + _permutes_to_f32(["u"], "0f4B000008") + "\n}")


_LOW_NIBBLES_F32 = tl.constexpr(_nibbles_to_f32(False))
_HIGH_NIBBLES_F32 = tl.constexpr(_nibbles_to_f32(True))
# how codes become fp32 for 16-bit activations (CVT; None: the PTX above on NVIDIA GPUs); set False to
# time the plain conversion against it
CODES_PTX_OVERRIDE = None


@triton.jit
def _dp4a(w, a, acc, ASM: tl.constexpr):
    """``acc`` plus the dot product of the four signed bytes of each int32 word of ``w`` and ``a``."""
    if ASM:
        out = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [w, a, acc],
                                        dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = acc
        for i in tl.static_range(4):
            out += ((w << (24 - 8 * i)) >> 24) * ((a << (24 - 8 * i)) >> 24)
    return out


@triton.jit
def _codes_f32(w, PTX: tl.constexpr):
    """int8 codes as fp32 (exact): byte permutes (``_CODES_F32``), or the plain conversion."""
    if PTX:
        out = tl.inline_asm_elementwise(_CODES_F32, "=f,=f,=f,=f,r", [w], dtype=tl.float32, is_pure=True, pack=4)
    else:
        out = w.to(tl.float32)
    return out


@triton.jit
def _nibbles_f32(b, PTX: tl.constexpr):
    """Packed int4 bytes (the even code in the low nibble, the odd in the high) as two fp32 tensors of
    codes (exact): byte permutes (``_LOW_NIBBLES_F32`` / ``_HIGH_NIBBLES_F32``), or shifts."""
    if PTX:
        lo = tl.inline_asm_elementwise(_LOW_NIBBLES_F32, "=f,=f,=f,=f,r", [b], dtype=tl.float32, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(_HIGH_NIBBLES_F32, "=f,=f,=f,=f,r", [b], dtype=tl.float32, is_pure=True, pack=4)
    else:
        v = b.to(tl.int32) & 0xFF
        lo = ((v << 28) >> 28).to(tl.float32)
        hi = ((v << 24) >> 28).to(tl.float32)
    return lo, hi


@triton.jit
def _words(ptr):
    return ptr.to(tl.pointer_type(tl.int32))


@triton.jit
def _qgemv_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, out_ptr, ids_ptr, weight_ptr, N, K, E,
                  stride_am, stride_sam, stride_sak, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                  UP: tl.constexpr, TOPK: tl.constexpr, S: tl.constexpr, WFMT: tl.constexpr,
                  AFMT: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVICT: tl.constexpr, ASM: tl.constexpr,
                  CVT: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)
    slot = tl.arange(0, S)
    if UP:
        p = tl.program_id(0)
        e = tl.load(ids_ptr + p)
        if (e < 0) | (e >= E):
            return
        ok = slot >= 0
        e_s = tl.zeros([S], dtype=tl.int64) + e
        a_row = tl.zeros([S], dtype=tl.int64) + p // TOPK          # both slots read x's row
        n_off = slot.to(tl.int64) * N                              # gate rows, then up rows
    else:
        t = tl.program_id(0).to(tl.int64)
        pair = t * TOPK + slot
        e_s = tl.load(ids_ptr + pair, mask=slot < TOPK, other=-1)
        ok = (slot < TOPK) & (e_s >= 0) & (e_s < E)
        e_s = tl.where(ok, e_s, 0).to(tl.int64)
        a_row = tl.where(ok, pair, 0)
        n_off = tl.zeros([S], dtype=tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = n_off[:, None] + offs_n.to(tl.int64)[None, :]                                  # [S, BN]
    w_mask = ok[:, None, None] & mask_n[None, :, None]
    w_rows = e_s[:, None] * stride_we + rows * stride_wn                                  # [S, BN]
    a_base = a_row * stride_am                                                            # [S]
    s_rows = sw_ptr + e_s[:, None] * stride_se + rows * stride_sn                        # [S, BN]
    s_mask = ok[:, None] & mask_n[None, :]
    sa = tl.zeros([S], dtype=tl.float32)
    if AFMT == 1:
        sa = tl.load(sa_ptr + a_row * stride_sam, mask=ok, other=0.0)

    if WFMT == 1:                 # int4: BLOCK_K codes per row and step, NG groups per step
        # the step's codes as U units: BLOCK_K / 8 words (8-bit activations: dp4a), else BLOCK_K / 2
        # bytes (byte j: codes 2j and 2j + 1, whose activations are de-interleaved columns j and KH + j)
        U: tl.constexpr = BLOCK_K // 8 if AFMT == 1 else BLOCK_K // 2
        UPG: tl.constexpr = U // NG                    # units per group within a step
        acc = tl.zeros([S, BLOCK_N, UPG if NG == 1 else NG], dtype=tl.float32)
        offs_u = tl.arange(0, U)
        KH = K // 2                                    # the odd half of a de-interleaved row starts here
        w_words = _words(w_ptr) + w_rows // 4                                             # [S, BN]
        for k0 in range(0, K, BLOCK_K):
            if AFMT == 1:           # 16x the codes as int8 words, dp4a with the activation code words
                kw = k0 // 8 + offs_u
                ww = tl.load(w_words[:, :, None] + kw[None, None, :], mask=w_mask, other=0, eviction_policy=EVICT)
                a_words = _words(a_ptr) + a_base // 4
                a_ev = tl.load(a_words[:, None] + kw[None, :], mask=ok[:, None], other=0)
                a_od = tl.load(a_words[:, None] + KH // 4 + kw[None, :], mask=ok[:, None], other=0)
                lo = (ww << 4) & _HIGH_NIBBLES
                hi = ww & _HIGH_NIBBLES
                part = _dp4a(lo, tl.broadcast_to(a_ev[:, None, :], ww.shape), tl.zeros_like(ww), ASM)
                part = _dp4a(hi, tl.broadcast_to(a_od[:, None, :], ww.shape), part, ASM)
                unit = 0.0625
            else:                   # each byte's two codes in fp32 times their activations
                kb = k0 // 2 + offs_u
                wb = tl.load(w_ptr + w_rows[:, :, None] + kb[None, None, :], mask=w_mask, other=0,
                             eviction_policy=EVICT)
                a_ev = tl.load(a_ptr + a_base[:, None] + kb[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
                a_od = tl.load(a_ptr + a_base[:, None] + KH + kb[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
                lo, hi = _nibbles_f32(wb, CVT)
                part = lo * a_ev[:, None, :] + hi * a_od[:, None, :]
                unit = 1.0
            if NG == 1:             # the step lies in one group: scale each unit's sum
                s = tl.load(s_rows + (k0 // G) * stride_sk, mask=s_mask, other=0.0)
                acc += part.to(tl.float32) * (s * unit)[:, :, None]
            else:                   # whole groups: their sums, each times its scale
                g = k0 // G + tl.arange(0, NG)
                s = tl.load(s_rows[:, :, None] + g[None, None, :] * stride_sk, mask=s_mask[:, :, None], other=0.0)
                sums = tl.sum(tl.reshape(part, [S, BLOCK_N, NG, UPG]), axis=3)
                acc += sums.to(tl.float32) * (s * unit)
        y = tl.sum(acc, axis=2)
        if AFMT == 1:
            y = y * sa[:, None]
    elif AFMT == 1:                 # w8a8: BLOCK_K codes = BLOCK_K / 4 words per row
        BKW: tl.constexpr = BLOCK_K // 4
        acc = tl.zeros([S, BLOCK_N, BKW], dtype=tl.int32)
        offs_w = tl.arange(0, BKW)
        a_words = _words(a_ptr) + a_base // 4
        w_words = _words(w_ptr) + w_rows // 4
        for k0 in range(0, K, BLOCK_K):
            kw = k0 // 4 + offs_w
            if EVEN_K:
                am = ok[:, None]
                wm = w_mask
            else:
                am = ok[:, None] & (kw < K // 4)[None, :]
                wm = w_mask & (kw < K // 4)[None, None, :]
            a = tl.load(a_words[:, None] + kw[None, :], mask=am, other=0)
            ww = tl.load(w_words[:, :, None] + kw[None, None, :], mask=wm, other=0, eviction_policy=EVICT)
            acc = _dp4a(ww, tl.broadcast_to(a[:, None, :], ww.shape), acc, ASM)
        s = tl.load(s_rows, mask=s_mask, other=0.0)
        y = tl.sum(acc, axis=2).to(tl.float32) * sa[:, None] * s
    else:                           # w8a16
        acc = tl.zeros([S, BLOCK_N, BLOCK_K], dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            if EVEN_K:
                am = ok[:, None]
                wm = w_mask
            else:
                am = ok[:, None] & (kk < K)[None, :]
                wm = w_mask & (kk < K)[None, None, :]
            a = tl.load(a_ptr + a_base[:, None] + kk[None, :], mask=am, other=0.0)
            w = tl.load(w_ptr + w_rows[:, :, None] + kk[None, None, :], mask=wm, other=0, eviction_policy=EVICT)
            acc += _codes_f32(w, CVT) * a.to(tl.float32)[:, None, :]
        s = tl.load(s_rows, mask=s_mask, other=0.0)
        y = tl.sum(acc, axis=2) * s

    dt = out_ptr.dtype.element_ty
    y = y.to(dt).to(tl.float32)                                                           # [S, BN]
    if UP:
        gate = tl.sum(tl.where(slot[:, None] == 0, y, 0.0), axis=0)
        up = tl.sum(tl.where(slot[:, None] == 1, y, 0.0), axis=0)
        act = gate / (1.0 + tl.exp(-gate)) * up
        col = offs_n
        if WFMT == 1:                       # the down projection reads its activations de-interleaved
            col = offs_n // 2 + (offs_n % 2) * (N // 2)
        tl.store(out_ptr + p.to(tl.int64) * N + col, act.to(dt), mask=mask_n)
    else:
        rw = tl.load(weight_ptr + pair, mask=ok, other=0.0)
        y = (y * rw[:, None]).to(dt).to(tl.float32)
        y = tl.where(ok[:, None], y, 0.0)
        tl.store(out_ptr + t * N + offs_n, tl.sum(y, axis=0).to(dt), mask=mask_n)


def quant_gemv(a, sa, w, sw, out, ids, weights_flat, *, up, top_k, N, K, wfmt, afmt, group, cfg, asm, pdl=False):
    """One projection of the one-token quantized experts: ``up`` writes ``out[p]`` (one intermediate row
    per pair, ``N`` = I), else ``out[t]`` (``N`` = H, the slots combined).  ``a``: the rows as
    quantize_rows_* or the float path leave them (x for up, the intermediate rows for down)."""
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    if wfmt == W_INT4:
        while K % bk:       # int4 steps have no K tail: halve to one that divides K (a group always does)
            bk //= 2
    P = ids.numel()
    programs = P if up else P // top_k
    if sa is None:
        sa = sw                                   # unused: any pointer
    s_am = sa.stride(0) if sa.dim() >= 1 else 0
    s_ak = sa.stride(1) if sa.dim() == 2 else 0
    s_sk = sw.stride(2) if sw.dim() == 3 else 0
    _qgemv_kernel[(programs, triton.cdiv(N, bn))](
        a, sa, w, sw, out, ids, weights_flat, N, K, w.shape[0],
        a.stride(0), s_am, s_ak, w.stride(0), w.stride(1), sw.stride(0), sw.stride(1), s_sk,
        UP=up, TOPK=top_k, S=2 if up else triton.next_power_of_2(top_k), WFMT=wfmt, AFMT=afmt, G=group or 128,
        NG=max(1, bk // (group or 128)),
        BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0, EVICT=cfg.get("evict", ""), ASM=asm,
        CVT=asm if CODES_PTX_OVERRIDE is None else CODES_PTX_OVERRIDE,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_options(pdl))


def gemv_scheme(wfmt: int, afmt: int) -> bool:
    """The schemes these kernels serve (see the module docstring)."""
    return (wfmt, afmt) in ((W_INT8, A_FLOAT), (W_INT8, A_INT8), (W_INT4, A_INT8), (W_INT4, A_FLOAT))
