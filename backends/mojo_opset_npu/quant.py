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
from mojo_opset.backend import OpImpl

from .combine import unpermute
from .experts import GEMM_DTYPES, MAX_GROUPS, MAX_LAST_DIM, grouped_matmul_reasons
from .forward import forward_reasons
from .permute import init_routing
from .runtime import device_reason, missing_ops, torch_npu_module

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


@torch.library.custom_op("mojo_npu::w8a8_int8_moe_forward", mutates_args=())
def w8a8_kernel(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13_q: torch.Tensor,
                w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor) -> torch.Tensor:
    return quant_forward(x, topk_ids, topk_weights, _Codes(w13_q, w13_scale, w2_q, w2_scale), w8a8_experts)


@torch.library.custom_op("mojo_npu::w8a16_int8_moe_forward", mutates_args=())
def w8a16_kernel(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13_q: torch.Tensor,
                 w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor) -> torch.Tensor:
    return quant_forward(x, topk_ids, topk_weights, _Codes(w13_q, w13_scale, w2_q, w2_scale), w8a16_experts)


def _fake(x, topk_ids, topk_weights, w13_q, w13_scale, w2_q, w2_scale):
    return torch.empty_like(x)


w8a8_kernel.register_fake(_fake)
w8a16_kernel.register_fake(_fake)
KERNELS = {"w8a8_int8": w8a8_kernel, "w8a16_int8": w8a16_kernel}


class _Codes:
    """The tensors of a QuantizedExperts, as the custom ops receive them (tensors only)."""

    def __init__(self, w13_q, w13_scale, w2_q, w2_scale):
        self.w13_q, self.w13_scale, self.w2_q, self.w2_scale = w13_q, w13_scale, w2_q, w2_scale


class NpuQuantMoeForward(OpImpl):
    op = "quant_moe_forward"
    supports_autograd = False

    def reasons(self, x, topk_ids, topk_weights, qexperts, activation="swiglu", **_):
        scheme = qexperts.scheme
        if scheme in DECLINED:
            return [f"scheme {scheme}: {DECLINED[scheme]}"]
        if scheme not in SERVED:
            return [f"scheme {scheme}: not implemented by the npu backend"]
        out = grouped_matmul_reasons() + missing_ops(*SERVED[scheme], since="2.5.1")
        out += [r for r in forward_reasons(x, topk_ids, topk_weights, qexperts.num_experts) if r not in out]
        r = device_reason("qexperts", qexperts.w13_q)
        if r:
            out.append(r)
        if activation != "swiglu":
            out.append(f"activation {activation!r}: only swiglu is implemented")
        if not (qexperts.w13_q.is_contiguous() and qexperts.w2_q.is_contiguous()):
            out.append("quantized weights are not contiguous; the backend does not copy them per call")
        if x.dtype not in GEMM_DTYPES:
            out.append(f"x dtype {x.dtype}: the quantized operators take fp16 or bf16 activations")
        E, N, H = qexperts.w13_shape
        if E > MAX_GROUPS:
            out.append(f"E = {E} experts: npu_grouped_matmul takes at most {MAX_GROUPS} groups")
        if max(N, H) > MAX_LAST_DIM:
            out.append(f"a GEMM dimension of {max(N, H)}: npu_grouped_matmul needs every last dim < 65536")
        return out

    def cache_key(self, x, topk_ids, topk_weights, qexperts, activation="swiglu", **_):
        return (qexperts.scheme, x.device.type, x.dtype, x.shape[0] == 0, topk_ids.device.type, topk_ids.dtype,
                topk_ids.numel() >= 2 ** 31, topk_weights.device.type, qexperts.device.type,
                tuple(qexperts.w13_shape), qexperts.w13_q.is_contiguous(), qexperts.w2_q.is_contiguous(), activation)

    def forward(self, x, topk_ids, topk_weights, qexperts, activation="swiglu", **_):
        q = qexperts
        return KERNELS[q.scheme](x, topk_ids, topk_weights, q.w13_q, q.w13_scale, q.w2_q, q.w2_scale)
