"""quant_moe_forward on torch_npu's quantized grouped-matmul operators.

* ``w8a8_int8``: the documented W8A8 chain -- npu_dynamic_quant (per-token int8) ->
  npu_grouped_matmul (int32 accumulators) -> npu_dequant_swiglu_quant (dequantize with the w13
  channel scales and token scales, SwiGLU, re-quantize per token) -> npu_grouped_matmul
  (per-channel x per-token dequantization to x's dtype) -> unpermute.  Versus the reference, the
  SwiGLU input and output are not rounded to x's dtype before re-quantization (a re-quantized code
  can differ by 1, which SPEC §3.6 allows), and with bf16 x the w2 channel scales enter the
  operator in bf16 (relative error <= 2**-9, the size of the output's own rounding).
* ``w8a16_int8``: weight-only npu_grouped_matmul (``antiquant_scale`` per output channel, in x's
  dtype) -> npu_swiglu -> weight-only npu_grouped_matmul -> unpermute.
* Declined: int4 schemes (our codes are packed two per byte along K; the operator takes int4 packed
  eight per int32, and a repack per call is not done) and ``w8a8_fp8_block`` (no fp8 grouped matmul
  is documented for Atlas A2/A3).
"""
from __future__ import annotations

import torch

from mojo_opset.contract.names import QUANT_MOE_FORWARD

from .combine import unpermute
from .experts import GEMM_DTYPES, GMM_LIMITS, grouped_matmul_reasons
from .forward import forward_reasons
from .permute import init_routing
from .platform import NpuOpImpl, missing_ops, torch_npu_module

SERVED = {  # besides npu_grouped_matmul
    "w8a8_int8": ("npu_dynamic_quant", "npu_dequant_swiglu_quant"),
    "w8a16_int8": ("npu_swiglu",),
}
DECLINED = {
    "w4a8_int4": "int4 codes are packed two per byte along K; npu_grouped_matmul takes int4 packed eight "
                 "per int32 (no repack per call)",
    "w4a16_int4": "int4 codes are packed two per byte along K; npu_grouped_matmul takes int4 packed eight "
                  "per int32 (no repack per call)",
    "w8a8_fp8_block": "no fp8 block-scaled grouped matmul is documented in torch_npu for Atlas A2/A3",
}


class Codes:
    """The tensors of a QuantizedExperts, as the custom ops receive them (tensors only)."""

    def __init__(self, w13_q, w13_scale, w2_q, w2_scale):
        self.w13_q, self.w13_scale, self.w2_q, self.w2_scale = w13_q, w13_scale, w2_q, w2_scale


def gmm(npu, x, w_t, ends, **kw):
    return npu.npu_grouped_matmul([x], [w_t], group_list=ends, split_item=2, group_type=0,
                                  group_list_type=0, **kw)[0]


def w8a8_experts(rows, counts, q):
    npu = torch_npu_module()
    ends = torch.cumsum(counts, 0)
    xq, sx = npu.npu_dynamic_quant(rows)
    acc = gmm(npu, xq, q.w13_q.transpose(1, 2), ends, output_dtype=torch.int32)
    aq, sa = npu.npu_dequant_swiglu_quant(
        acc, weight_scale=q.w13_scale, activation_scale=sx.float(), bias=None, quant_scale=None,
        quant_offset=None, group_index=counts, activate_left=True,  # silu(gate = left half) * up
        quant_mode=1)
    # the per-channel scale's dtype selects the output dtype: bf16 -> bf16, fp32 -> fp16
    scale = q.w2_scale.to(torch.bfloat16) if rows.dtype == torch.bfloat16 else q.w2_scale
    return gmm(npu, aq, q.w2_q.transpose(1, 2), ends, scale=[scale], per_token_scale=[sa.float()],
               output_dtype=rows.dtype)


def w8a16_experts(rows, counts, q):
    npu = torch_npu_module()
    ends = torch.cumsum(counts, 0)
    dt = rows.dtype
    h = gmm(npu, rows, q.w13_q.transpose(1, 2), ends, antiquant_scale=[q.w13_scale.to(dt)])
    a = npu.npu_swiglu(h, dim=-1)
    return gmm(npu, a, q.w2_q.transpose(1, 2), ends, antiquant_scale=[q.w2_scale.to(dt)])


def quant_forward(x, topk_ids, topk_weights, q, experts):
    rows, pair_row, counts = init_routing(x, topk_ids, q.w13_q.shape[0])
    return unpermute(experts(rows, counts, q), pair_row, topk_weights)


def w8a8_int8_forward(x, topk_ids, topk_weights, w13_q, w13_scale, w2_q, w2_scale):
    return quant_forward(x, topk_ids, topk_weights, Codes(w13_q, w13_scale, w2_q, w2_scale), w8a8_experts)


def w8a16_int8_forward(x, topk_ids, topk_weights, w13_q, w13_scale, w2_q, w2_scale):
    return quant_forward(x, topk_ids, topk_weights, Codes(w13_q, w13_scale, w2_q, w2_scale), w8a16_experts)


class NpuQuantMoeForward(NpuOpImpl):
    op = QUANT_MOE_FORWARD
    dtypes = GEMM_DTYPES        # the quantized operators take fp16 or bf16 activations
    limits = GMM_LIMITS

    def extra_reasons(self, call):
        q = call.qexperts
        if q.scheme in DECLINED:
            return [f"scheme {q.scheme}: {DECLINED[q.scheme]}"]
        if q.scheme not in SERVED:
            return [f"scheme {q.scheme}: not implemented by the npu backend"]
        out = grouped_matmul_reasons() + missing_ops(*SERVED[q.scheme], since="2.5.1")
        out += [r for r in forward_reasons(call.topk_ids) if r not in out]
        if not (q.w13_q.is_contiguous() and q.w2_q.is_contiguous()):
            out.append("quantized weights are not contiguous; the backend does not copy them per call")
        return out

    def forward(self, call):
        q = call.qexperts
        op = getattr(torch.ops.mojo_npu, f"{q.scheme}_moe_forward")   # one custom op per served scheme
        return op(call.x, call.topk_ids, call.topk_weights, q.w13_q, q.w13_scale, q.w2_q, q.w2_scale)
