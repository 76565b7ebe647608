"""The torch reference of the ``quant_moe_forward`` op: routed tokens through quantized experts.

Pairs are sorted by expert (the core permute), the experts run on their rows, and the combine sums
the weighted pair outputs in fp32 (the core combine).  On each expert's rows, with dt = x's dtype:

* a8 schemes: quantize the rows per token, exact integer (fp8: exact float64) GEMM, dequantize to
  fp32 and round to dt; SwiGLU in fp32, rounded to dt; re-quantize per token; second GEMM likewise.
* a16 schemes: dequantize the expert's weights (code x scale in fp32), cast to dt, and run the same
  ops as the bf16/fp32 reference (``F.linear`` in dt, SwiGLU in fp32 rounded to dt).

All experts run at once, with no host read of the group sizes (:mod:`.grouped`): per-row work
(smoothing, activation quantization, SwiGLU) runs on all rows, each row's smoothing multipliers
gathered by its expert id; the GEMMs run

* a8: on tiles of rows that each belong to one expert, batched with their experts' codes gathered
  per tile (the integer and fp8 block sums are exact, so the tiling changes no bit); scales are
  applied per tile by the same elementwise ops as one expert's GEMM, and the group sums reduce the
  same contiguous layout;
* a16: as ``torch._grouped_mm`` over the dequantized weights (one ``mm`` per expert on the CPU, so
  the bits of a per-expert ``F.linear``), where it exists for the device and dtype; elsewhere, and
  when only a few experts can be active (few rows), on tiles; in the deterministic mode on tiles of
  :data:`invariant.ROWS` rows in batches of one shape (each row's bits independent of the batch, the
  fixed-shape GEMM blocks of :func:`invariant.linear`).

Work is chunked (over experts or tiles) to bound memory: the dequantized weights of all experts are
never materialised when they are large.
"""
from __future__ import annotations

import torch

from ..reference import invariant
from ..reference.combine import combine_reference
from ..reference.experts import _aligned, grouped_mm_available
from ..reference.permute import permute_reference
from ..reference.swiglu import swiglu
from .activations import quantize_tokens_fp8, quantize_tokens_int8
from .grouped import BUDGET, make_tiles, row_experts, tile_bound, tile_height
from .matmul import int4_codes, int4_nibbles, linear_fp8_block, linear_w4a8, linear_w8a8
from .schemes import FP8_BLOCK

DEQUANT_BUDGET = 1 << 29    # elements of dequantized a16 weights held at once by the grouped path
DET_TILES = 16              # tiles per GEMM in the deterministic a16 path (fewer when they are large)


class _Projections:
    """The two quantized projections of one call over expert-sorted rows: ``self(v, q, s)`` is
    ``v [R, K] @ W_e.T`` for each row's expert e, ``[R, N]`` in x's dtype (rows past the groups: any)."""

    def __init__(self, x, group_ends, qexperts, deterministic):
        info = qexperts.info
        self.fmt, self.act, self.group = info.weight, info.activation, qexperts.group_size
        self.dt, self.deterministic = x.dtype, deterministic
        R, E = x.shape[0], qexperts.num_experts
        H, I = qexperts.hidden_size, qexperts.intermediate_size
        self.R, self.group_ends = R, group_ends
        self.batch, self.grouped = None, False
        if self.act is None and deterministic:
            # one bmm shape for every call: tiles of invariant.ROWS rows, a fixed number per GEMM
            self.batch = max(1, min(DET_TILES, BUDGET // (12 * I * H)))
            self.tiles = make_tiles(group_ends, R, invariant.ROWS, self.batch)
            return
        # per-group partial sums (int4 groups, fp8 blocks) grow with the tile height: shorter tiles
        m = tile_height(R, E, 64 if self.fmt != "int8" and self.act is not None else 256)
        if self.act is None and _has_grouped_mm(x):
            # the CPU always (per-expert mm, bit for bit); a GPU when the dequantized weights fit
            # and most experts may have rows (otherwise tiles touch only the experts in use)
            self.grouped = x.device.type == "cpu" or (2 * I * H * E <= DEQUANT_BUDGET and 2 * tile_bound(R, E, m) > E)
        if self.grouped:
            self.ends32 = group_ends.to(torch.int32)
        else:
            self.tiles = make_tiles(group_ends, R, m)

    def __call__(self, v, q, s):
        if self.act is not None:
            return self._a8(v, q, s)
        if self.grouped:
            return self._a16_grouped(v, q, s)
        return self._a16_tiles(v, q, s)

    # ------------------------------------------------------------------ a8: exact GEMMs on tiles

    def _a8(self, v, q, s):
        fmt, R, tiles = self.fmt, self.R, self.tiles
        xq, sx = quantize_tokens_fp8(v) if self.act == "fp8" else quantize_tokens_int8(v)
        N, K = q.shape[1], xq.shape[1]
        # bytes per tile: the gathered weights and their GEMM copy, and the per-group partial sums
        if fmt == "fp8_block":
            per_tile = 9 * N * K + 24 * tiles.m * N * (K // FP8_BLOCK)
        else:
            per_tile = 6 * N * K + 12 * tiles.m * N * (K // self.group if fmt == "int4" else 2)
        y = v.new_empty(R + 1, N, dtype=self.dt)
        for c in tiles.chunks(per_tile):
            e, src = tiles.expert[c], tiles.src[c]
            xt, st, qt, swt = xq[src], sx[src], q[e], s[e]
            if fmt == "fp8_block":
                out = linear_fp8_block(xt, st, qt, swt, self.deterministic)
            elif fmt == "int8":
                out = linear_w8a8(xt, st, qt, swt)
            else:
                out = linear_w4a8(xt, st, qt, swt, self.group, self.deterministic)
            y.index_copy_(0, tiles.dest[c].flatten(), out.to(self.dt).flatten(0, 1))
        return y[:R]

    # ------------------------------------------------------------------ a16: dequantized weights

    def _dequantize(self, q, s, out):
        """``dequantize_weight(q, s).to(out.dtype)`` without intermediates: code x scale in fp32, rounded
        once to out's dtype (int4: the even- and odd-index codes written to their columns)."""
        if self.fmt == "int8":
            return torch.mul(q, s.unsqueeze(-1), out=out)
        g = self.group
        if g % 2:
            torch.mul(int4_codes(q).unflatten(-1, (-1, g)), s.unsqueeze(-1), out=out.unflatten(-1, (-1, g)))
        else:
            pairs = out.unflatten(-1, (-1, g // 2, 2))
            for j, nibble in enumerate(int4_nibbles(q)):
                torch.mul(nibble.unflatten(-1, (-1, g // 2)), s.unsqueeze(-1), out=pairs[..., j])
        return out

    def _a16_tiles(self, v, q, s):
        R, tiles = self.R, self.tiles
        N, K = q.shape[1], v.shape[1]
        y = v.new_empty(R + 1, N)
        for c in tiles.chunks((2 + v.element_size()) * N * K, self.batch):
            e = tiles.expert[c]
            w = self._dequantize(q[e], s[e], v.new_empty(e.shape[0], N, K))
            y.index_copy_(0, tiles.dest[c].flatten(), torch.bmm(v[tiles.src[c]], w.transpose(1, 2)).flatten(0, 1))
        return y[:R]

    def _a16_grouped(self, v, q, s):
        """``torch._grouped_mm`` over chunks of experts (one chunk unless the dequantized weights pass
        DEQUANT_BUDGET, which only the CPU allows, reading the chunks' row ranges on the host)."""
        E, N, K = q.shape[0], q.shape[1], v.shape[1]
        step = max(1, DEQUANT_BUDGET // (N * K))
        v = _rows16(v)
        if step >= E:
            return torch._grouped_mm(v, self._weights(q, s, 0, E, K).transpose(1, 2), offs=self.ends32)
        ends = [0] + self.group_ends.tolist()                    # a CPU tensor: no device sync
        y = v.new_zeros(self.R, N)
        for e0 in range(0, E, step):
            e1 = min(E, e0 + step)
            r0, r1 = ends[e0], ends[e1]
            if r1 > r0:
                w = self._weights(q, s, e0, e1, K).transpose(1, 2)
                y[r0:r1] = torch._grouped_mm(v[r0:r1], w, offs=self.ends32[e0:e1] - r0)
        return y

    def _weights(self, q, s, e0, e1, K):
        """Dequantized weights ``[e1 - e0, N, K]`` of experts ``[e0, e1)`` in x's dtype, rows 16-byte
        strided (int4 codes unpacked in chunks of about BUDGET bytes)."""
        N = q.shape[1]
        w = torch.empty(e1 - e0, N, _pad16(K, self.dt), dtype=self.dt, device=q.device)[..., :K]
        step = max(1, BUDGET // (2 * N * K))
        for a in range(e0, e1, step):
            b = min(e1, a + step)
            self._dequantize(q[a:b], s[a:b], w[a - e0:b - e0])
        return w


def _has_grouped_mm(x: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` serves x's device and dtype (strides are padded by the caller)."""
    cap = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None
    return grouped_mm_available(x.device.type, x.dtype, cap)


def _pad16(K: int, dtype: torch.dtype) -> int:
    per = 16 // torch.empty((), dtype=dtype).element_size()
    return -(-K // per) * per


def _rows16(t: torch.Tensor) -> torch.Tensor:
    """``t [R, K]`` as ``torch._grouped_mm`` takes it: rows 16-byte strided from an aligned start (a
    view into zero-padded storage when K x the element size is not a multiple of 16)."""
    K = t.shape[1]
    if _pad16(K, t.dtype) == K:
        return _aligned(t)
    buf = t.new_zeros(t.shape[0], _pad16(K, t.dtype))
    buf[:, :K] = t
    return buf[:, :K]


def quant_experts_rows(permuted_x, group_ends, qexperts, activation="swiglu", deterministic=False):
    """The ``moe_quant_experts`` reference: expert-sorted rows through their quantized experts;
    ``[R, H]`` in permuted_x's dtype, rows past ``group_ends[-1]`` zero; ``deterministic``: batch-invariant.

    With activation smoothing, each projection's input is first multiplied by its row's expert's
    multipliers: in fp32 for the a8 schemes (their activation quantizer reads fp32), rounded to x's
    dtype for the a16 schemes (their GEMM runs in that dtype)."""
    R, dt = permuted_x.shape[0], permuted_x.dtype
    if permuted_x.device.type == "meta" or R == 0:      # shapes only (no values to route)
        return torch.zeros_like(permuted_x)
    E = qexperts.num_experts
    expert = row_experts(group_ends, R)
    row_expert = expert.clamp(max=E - 1)
    project = _Projections(permuted_x, group_ends, qexperts, deterministic)
    weight_only = qexperts.info.activation is None

    def smooth(v, m):
        if m is None:
            return v
        v = v.float() * m[row_expert]
        return v.to(dt) if weight_only else v

    a = swiglu(project(smooth(permuted_x, qexperts.w13_smooth), qexperts.w13_q, qexperts.w13_scale), dt)
    y = project(smooth(a, qexperts.w2_smooth), qexperts.w2_q, qexperts.w2_scale)
    return torch.where((expert < E).unsqueeze(1), y, y.new_zeros(()))


def quant_experts_reference(x, topk_ids, topk_weights, qexperts, activation="swiglu"):
    """``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` with quantized experts; ``[T, H]`` in x's dtype.

    topk_ids index qexperts' experts (a rank's local ids under expert parallelism)."""
    T, E = x.shape[0], qexperts.num_experts
    px, _counts, ends, _row_src, pair_row = permute_reference(x, topk_ids, E, align=1)
    return combine_reference(quant_experts_rows(px, ends, qexperts, activation), pair_row, topk_weights, T)
