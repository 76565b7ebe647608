"""moe_combine on ``torch_npu.npu_moe_token_unpermute`` or ``npu_moe_finalize_routing``.

``npu_moe_token_unpermute`` (torch_npu >= 2.6.0) reads the token-major index map, which is our
``pair_row`` as is; ``npu_moe_finalize_routing`` reads it slot-major, so it gets the transpose.
Both take the routing weights in the expert output's dtype (bf16/fp16 weights carry a relative
rounding error of at most 2**-9 / 2**-12 each, the size of the output's own rounding).
"""
from __future__ import annotations

import torch

from mojo_opset.contract.names import MOE_COMBINE

from .platform import NpuOpImpl, torch_npu_module, version_tuple

UNPERMUTE_OP = "npu_moe_token_unpermute"
FINALIZE_OP = "npu_moe_finalize_routing"
FINALIZE_OPTIONAL_ARGS_SINCE = (2, 4)   # op-plugin 6.0.0: skip/bias/expert arguments may be None
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unpermute(expert_out, pair_row, topk_weights):
    """``[T, H]``: each token's weighted sum of its K rows of ``expert_out``."""
    npu = torch_npu_module()
    T, K = topk_weights.shape
    w = topk_weights.to(expert_out.dtype).contiguous()
    rows = expert_out.contiguous()
    if hasattr(npu, UNPERMUTE_OP):
        return npu.npu_moe_token_unpermute(rows, pair_row.to(torch.int32).contiguous(), probs=w)
    slot_major = pair_row.view(T, K).t().reshape(-1).to(torch.int32)
    return npu.npu_moe_finalize_routing(rows, None, None, None, w, slot_major, None, drop_pad_mode=0)


def unpermute_op_reasons() -> list[str]:
    npu = torch_npu_module()
    if hasattr(npu, UNPERMUTE_OP):
        return []
    if hasattr(npu, FINALIZE_OP) and version_tuple(npu) >= FINALIZE_OPTIONAL_ARGS_SINCE:
        return []
    return [f"torch_npu {getattr(npu, '__version__', '?')} has neither {UNPERMUTE_OP} (torch_npu >= 2.6.0) "
            f"nor {FINALIZE_OP} with optional arguments (torch_npu >= 2.4.0)"]


class NpuCombine(NpuOpImpl):
    op = MOE_COMBINE
    dtypes = FLOAT_DTYPES

    def extra_reasons(self, call):
        out = unpermute_op_reasons()
        if call.num_tokens == 0:
            out.append("T = 0: nothing to combine")
        rows, pairs = call.expert_out.shape[0], call.pair_row.numel()
        if rows != pairs:
            out.append(f"expert_out has {rows} rows for {pairs} pairs (padded groups, align > 1): the "
                       "unpermute operators expect exactly T*K rows")
        return out

    def forward(self, call):
        return torch.ops.mojo_npu.combine(call.expert_out, call.pair_row, call.topk_weights)
