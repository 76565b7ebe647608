"""moe_experts on the ttx grouped SwiGLU kernels (``experts_kernel``, op ``mojo_ttx::experts``).

Only SwiGLU: ``activation`` is an option not declared here.  Row tiles are masked at group bounds,
so any group start works (``required_alignment = 1``).
"""
from __future__ import annotations

import torch

from mojo_opset.contract.names import MOE_EXPERTS

from .platform import TtxOpImpl

INT32_MAX = 2**31 - 1


class Experts(TtxOpImpl):
    op = MOE_EXPERTS
    required_alignment = 1

    def extra_reasons(self, call):
        out = super().extra_reasons(call)
        w13, w2 = call.w13, call.w2
        for name, w in (("w13", w13), ("w2", w2)):
            if not w.is_contiguous():
                out.append(f"{name} is not contiguous: the ttx experts kernel reads contiguous weight rows "
                           "and will not copy the expert weights on every call")
        if w13.shape[1] * w13.shape[2] > INT32_MAX:
            out.append("one expert's w13 has more than 2**31 elements, beyond the ttx experts kernel's "
                       "int32 expert stride")
        return out

    def forward(self, call):
        return torch.ops.mojo_ttx.experts(call.permuted_x, call.group_ends, call.w13, call.w2)
