"""``MojoMoEGating``: the original's router, a thin layer over :func:`mojo_opset.moe_gating`.

Its weight is ``gate_weight [hidden_size, num_experts]`` in float32 (the transpose of this library's
``[E, H]`` layout, passed as a view), the scores are a softmax computed from an fp32 router GEMM, and
the top-k weights are always renormalised.  Ties go to the lower expert id here (the original's
``torch.topk`` left them unspecified).
"""
from __future__ import annotations

import torch
from torch import nn

from ..functional import moe_gating
from .operator import MojoOperator, check_size

__all__ = ["MojoMoEGating"]


def routing_kwargs(module, forced_expert_ids) -> dict:
    """The routing keywords of the original (softmax, renormalised, fp32 router GEMM) for the
    functional ops, with the module's pinned backend."""
    return dict(route_norm=True, router_dtype=torch.float32, forced_expert_ids=forced_expert_ids,
                backend=module._backend)


class MojoMoEGating(MojoOperator, core=True):
    """Softmax top-k router with renormalised weights; ``forward`` returns ``(top_k_indices int32
    [T, K], top_k_gates float32 [T, K])``.  ``forced_expert_ids [T, K]`` replays a routing; an entry
    -1 keeps the natural choice for that slot (filled with the best expert not forced in its row)."""

    _op = "moe_gating"
    _mojo_routing_layer = True   # RouterReplay can record and replay it when used on its own

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, **kwargs):
        super().__init__(**kwargs)
        check_size("hidden_size", hidden_size)
        check_size("num_experts", num_experts)
        check_size("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts = {num_experts}, got {top_k}")
        self.top_k = top_k
        self.gate_weight = nn.Parameter(torch.zeros(hidden_size, num_experts, **self._factory(torch.float32)))
        self.gate_weight.force_dtype = torch.float32    # kept fp32 across .to(dtype), as the original's loaders do
        self.last_topk_ids: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return self.gate_weight.shape[0]

    @property
    def num_experts(self) -> int:
        return self.gate_weight.shape[1]

    def forward(self, hidden_states: torch.Tensor, forced_expert_ids: torch.Tensor | None = None):
        ids, gates = moe_gating(hidden_states, self.gate_weight.t(), self.top_k,
                                   **routing_kwargs(self, forced_expert_ids))
        self.last_topk_ids = ids
        return ids, gates

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}"
