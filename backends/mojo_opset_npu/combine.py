"""moe_combine on ``torch_npu.npu_moe_token_unpermute`` or ``npu_moe_finalize_routing``.

``npu_moe_token_unpermute`` (torch_npu >= 2.6.0) reads the token-major index map, which is our
``pair_row`` as is; ``npu_moe_finalize_routing`` reads it slot-major, so it gets the transpose.
Both take the routing weights in the expert output's dtype (bf16/fp16 weights carry a relative
rounding error of at most 2**-9 / 2**-12 each, the size of the output's own rounding).
"""
from __future__ import annotations

import torch
from mojo_opset.backend import OpImpl

from .runtime import device_reason, torch_npu_module, version_tuple

UNPERMUTE_OP = "npu_moe_token_unpermute"
FINALIZE_OP = "npu_moe_finalize_routing"
FINALIZE_OPTIONAL_ARGS_SINCE = (2, 4)   # op-plugin 6.0.0: skip/bias/expert arguments may be None
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unpermute(expert_out, pair_row, topk_weights):
    npu = torch_npu_module()
    T, K = topk_weights.shape
    w = topk_weights.to(expert_out.dtype).contiguous()
    rows = expert_out.contiguous()
    if hasattr(npu, UNPERMUTE_OP):
        return npu.npu_moe_token_unpermute(rows, pair_row.to(torch.int32).contiguous(), probs=w)
    slot_major = pair_row.view(T, K).t().reshape(-1).to(torch.int32)
    return npu.npu_moe_finalize_routing(rows, None, None, None, w, slot_major, None, drop_pad_mode=0)


@torch.library.custom_op("mojo_npu::combine", mutates_args=())
def combine_kernel(expert_out: torch.Tensor, pair_row: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    return unpermute(expert_out, pair_row, topk_weights)


@combine_kernel.register_fake
def _(expert_out, pair_row, topk_weights):
    return expert_out.new_empty((topk_weights.shape[0], expert_out.shape[1]))


def unpermute_op_reasons() -> list[str]:
    npu = torch_npu_module()
    if hasattr(npu, UNPERMUTE_OP):
        return []
    if hasattr(npu, FINALIZE_OP) and version_tuple(npu) >= FINALIZE_OPTIONAL_ARGS_SINCE:
        return []
    return [f"torch_npu {getattr(npu, '__version__', '?')} has neither {UNPERMUTE_OP} (torch_npu >= 2.6.0) "
            f"nor {FINALIZE_OP} with optional arguments (torch_npu >= 2.4.0)"]


def combine_reasons(expert_out, pair_row, topk_weights, num_tokens) -> list[str]:
    out = unpermute_op_reasons()
    for name, t in (("expert_out", expert_out), ("pair_row", pair_row), ("topk_weights", topk_weights)):
        r = device_reason(name, t)
        if r:
            out.append(r)
    if expert_out.dtype not in FLOAT_DTYPES:
        out.append(f"expert_out dtype {expert_out.dtype}: the unpermute operators take fp16, bf16 or fp32")
    if num_tokens == 0:
        out.append("T = 0: nothing to combine")
    if expert_out.shape[0] != pair_row.numel():
        out.append(f"expert_out has {expert_out.shape[0]} rows for {pair_row.numel()} pairs (padded groups, "
                   "align > 1): the unpermute operators expect exactly T*K rows")
    return out


class NpuCombine(OpImpl):
    op = "moe_combine"
    supports_autograd = False

    def reasons(self, expert_out, pair_row, topk_weights, num_tokens, **_):
        return combine_reasons(expert_out, pair_row, topk_weights, num_tokens)

    def cache_key(self, expert_out, pair_row, topk_weights, num_tokens, **_):
        return (expert_out.device.type, expert_out.dtype, pair_row.device.type, topk_weights.device.type,
                num_tokens == 0, expert_out.shape[0] == pair_row.numel())

    def forward(self, expert_out, pair_row, topk_weights, num_tokens, **_):
        return combine_kernel(expert_out, pair_row, topk_weights)
