"""moe_combine: each token's K expert rows summed in slot order in fp32 (batch-invariant)."""
from __future__ import annotations

import torch

from mojo_opset.contract.names import MOE_COMBINE

from .combine_kernel import combine
from .platform import TritonOpImpl, eager, serialized


class CombineImpl(TritonOpImpl):
    op = MOE_COMBINE
    options = frozenset({"deterministic"})

    def forward(self, call):
        op = combine if eager() else torch.ops.mojo_triton.moe_combine
        with serialized():
            return op(call.expert_out, call.pair_row, call.topk_weights, call.num_tokens)
