"""moe_combine on the ttx combine kernel (``combine_kernel``, op ``mojo_ttx::combine``): each
token's K rows in slot order, fp32 accumulation, no atomics."""
from __future__ import annotations

import torch

from mojo_opset.contract.names import MOE_COMBINE

from .platform import TtxOpImpl, index_dtype_reason


class Combine(TtxOpImpl):
    op = MOE_COMBINE

    def extra_reasons(self, call):
        out = super().extra_reasons(call)
        r = index_dtype_reason("pair_row", call.pair_row.dtype)
        if r:
            out.append(r)
        return out

    def forward(self, call):
        return torch.ops.mojo_ttx.combine(call.expert_out, call.pair_row, call.topk_weights, call.num_tokens)
