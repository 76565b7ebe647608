"""``MojoExperts``: the original's grouped SwiGLU experts, a thin layer over :func:`mojo_opset.moe_experts`.

Its ``up_proj_weight [E, 2I, H]`` (gate rows, then up rows) and ``down_proj_weight [E, H, I]`` are
this library's ``w13`` and ``w2`` as they are, so checkpoints load unchanged.  Numerics follow this
library's reference (each GEMM's output rounded to the input dtype, SwiGLU in fp32); the original's
torch reference ran the whole expert in fp32 and rounded once, a difference within ``mixed_tol``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..functional import moe_experts
from .operator import MojoOperator, check_size

__all__ = ["MojoExperts", "check_activation", "group_ends"]


def check_activation(activation, cls: str) -> None:
    if activation != "swiglu":
        raise NotImplementedError(f"{cls}: activation must be 'swiglu' (the only one supported), got {activation!r}")


def group_ends(tokens_per_expert: torch.Tensor, num_experts: int, device: torch.device) -> torch.Tensor:
    """The original's per-expert row counts -> this library's inclusive ``group_ends`` (int32)."""
    if not isinstance(tokens_per_expert, torch.Tensor):
        raise TypeError(f"tokens_per_expert must be a torch.Tensor, got {type(tokens_per_expert).__name__}")
    if tokens_per_expert.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tokens_per_expert must be int32 or int64, got {tokens_per_expert.dtype}")
    if tuple(tokens_per_expert.shape) != (num_experts,):
        raise ValueError(f"tokens_per_expert must have shape [num_experts] = [{num_experts}], "
                         f"got {list(tokens_per_expert.shape)}")
    return torch.cumsum(tokens_per_expert.to(device), 0).to(torch.int32)


class MojoExperts(MojoOperator, core=True):
    """``forward(sorted_hidden_states [R, H], tokens_per_expert [E])`` -> ``[R, H]``: rows grouped by
    expert (expert 0's first); rows past ``sum(tokens_per_expert)`` come back as zeros."""

    _op = "moe_experts"

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "swiglu",
                 **kwargs):
        super().__init__(**kwargs)
        check_activation(activation, "MojoExperts")
        E, H, I = (check_size("num_experts", num_experts, lo=0), check_size("hidden_size", hidden_size),
                   check_size("intermediate_size", intermediate_size))
        self.activation = activation
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, I
        self.up_proj_weight = nn.Parameter(torch.zeros(E, 2 * I, H, **self._factory()))
        self.down_proj_weight = nn.Parameter(torch.zeros(E, H, I, **self._factory()))

    def forward(self, sorted_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        ends = group_ends(tokens_per_expert, self.num_experts, sorted_hidden_states.device)
        return moe_experts(sorted_hidden_states, ends, self.up_proj_weight, self.down_proj_weight,
                              activation=self.activation, backend=self._backend)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}")
