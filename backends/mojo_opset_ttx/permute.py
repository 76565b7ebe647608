"""moe_permute on the ttx counting-sort kernels (``permute_kernel``, op ``mojo_ttx::permute``)."""
from __future__ import annotations

import torch

from mojo_opset.contract.names import MOE_PERMUTE

from . import permute_kernel
from .platform import TtxOpImpl, index_dtype_reason

INT32_MAX = 2**31 - 1
MAX_PAIRS = 2**24  # pair ids are compared as fp32 (exact below 2**24) and stored as int32


class Permute(TtxOpImpl):
    op = MOE_PERMUTE
    options = frozenset({"align"})
    limits = {"num_experts": permute_kernel.MAX_EXPERTS}

    def extra_reasons(self, call):
        out = super().extra_reasons(call)
        ids = call.topk_ids
        r = index_dtype_reason("topk_ids", ids.dtype)
        if r:
            out.append(r)
        rows = ids.numel() + call.num_experts * (call.align - 1)
        if ids.numel() >= MAX_PAIRS or rows > INT32_MAX:
            out.append("T*K reaches 2**24 pairs, beyond the ttx permute kernel's index range")
        return out

    def forward(self, call):
        return torch.ops.mojo_ttx.permute(call.x, call.topk_ids, call.num_experts, call.align)
