"""moe_permute: the device-side align/permute kernels (no host sync)."""
from __future__ import annotations

import torch

from mojo_opset.contract.names import MOE_PERMUTE

from .align_kernel import MAX_EXPERTS, permute
from .platform import TritonOpImpl, eager, serialized


class PermuteImpl(TritonOpImpl):
    op = MOE_PERMUTE
    options = frozenset({"align"})
    limits = {"num_experts": MAX_EXPERTS}

    def forward(self, call):
        op = permute if eager() else torch.ops.mojo_triton.moe_permute
        with serialized():
            return op(call.x, call.topk_ids, call.num_experts, call.align)
