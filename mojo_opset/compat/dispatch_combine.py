"""``MojoMoEDispatch`` and ``MojoMoECombine``: the original's token reorder and weighted sum, as thin
layers over :func:`mojo_opset.moe_permute` and :func:`mojo_opset.moe_combine`.

The original's dispatch returns the rows sorted by expert with, per row, its gate and its token; the
order inside an expert's bucket was left open there and is the stable (token, slot) order here.  Its
combine scatter-adds any rows to their tokens, so a token may have any number of rows (fewer than
top_k under expert parallelism); this library's combine takes exactly K rows per token, so the rows
are laid out as ``[T, K']`` slots (K' = the most rows any token has; the others point to a zero row
with weight 0) and the weighted sum is the core combine's, accumulated in fp32.
"""
from __future__ import annotations

import torch

from ..functional import moe_combine, moe_permute
from .operator import MojoOperator, check_size

__all__ = ["MojoMoEDispatch", "MojoMoECombine"]


def _check(name: str, t, ndim: int, *, integer: bool = False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {list(t.shape)}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if not integer and not t.is_floating_point():
        raise TypeError(f"{name} must have a float dtype, got {t.dtype}")


class MojoMoEDispatch(MojoOperator, core=True):
    """``forward(hidden_states [T, H], top_k_gates [T, K], top_k_indices [T, K])`` ->
    ``(sorted_hidden_states [T*K, H], tokens_per_expert int32 [E], sorted_gates float32 [T*K, 1],
    token_indices int32 [T*K])``, rows grouped by expert id."""

    _op = "moe_permute"

    def __init__(self, num_experts: int, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = check_size("num_experts", num_experts)

    def forward(self, hidden_states: torch.Tensor, top_k_gates: torch.Tensor, top_k_indices: torch.Tensor):
        _check("hidden_states", hidden_states, 2)
        _check("top_k_indices", top_k_indices, 2, integer=True)
        _check("top_k_gates", top_k_gates, 2)
        if top_k_gates.shape != top_k_indices.shape:
            raise ValueError(f"top_k_gates must have the shape of top_k_indices {list(top_k_indices.shape)}, "
                             f"got {list(top_k_gates.shape)}")
        K = top_k_indices.shape[1]
        rows, counts, _ends, row_src, _pair_row = moe_permute(
            hidden_states, top_k_indices.to(torch.int32), self.num_experts, backend=self._backend)
        pair = row_src.long()                        # align=1: every row holds pair t*K + j
        token_indices = torch.div(pair, K, rounding_mode="floor").to(torch.int32)
        sorted_gates = top_k_gates.float().reshape(-1)[pair].unsqueeze(-1)
        return rows, counts, sorted_gates, token_indices

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


class MojoMoECombine(MojoOperator, core=True):
    """``forward(output_buffer [T, H], expert_outputs [R, H], sorted_gates [R, 1], token_indices [R])``
    -> ``[T, H]`` in expert_outputs' dtype: each token's rows summed (times their gates with
    ``multiply_by_gates``).  As in the original, output_buffer gives T and H; its values are not read."""

    _op = "moe_combine"

    def __init__(self, multiply_by_gates: bool = True, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(multiply_by_gates, bool):
            raise TypeError(f"multiply_by_gates must be a bool, got {type(multiply_by_gates).__name__}")
        self.multiply_by_gates = multiply_by_gates

    def forward(self, output_buffer: torch.Tensor, expert_outputs: torch.Tensor, sorted_gates: torch.Tensor,
                token_indices: torch.Tensor) -> torch.Tensor:
        _check("output_buffer", output_buffer, 2)
        _check("expert_outputs", expert_outputs, 2)
        _check("token_indices", token_indices, 1, integer=True)
        T, H = output_buffer.shape
        R = expert_outputs.shape[0]
        if expert_outputs.shape[1] != H:
            raise ValueError(f"expert_outputs must have shape [R, H] with H = output_buffer.shape[1] = {H}, "
                             f"got {list(expert_outputs.shape)}")
        if token_indices.shape[0] != R:
            raise ValueError(f"token_indices must have one entry per row of expert_outputs ({R}), "
                             f"got {token_indices.shape[0]}")
        if not isinstance(sorted_gates, torch.Tensor) or sorted_gates.numel() != R:
            raise ValueError(f"sorted_gates must hold one gate per row of expert_outputs ({R}), got "
                             f"{list(sorted_gates.shape) if isinstance(sorted_gates, torch.Tensor) else sorted_gates}")
        dev = expert_outputs.device
        tok = token_indices.to(dev, torch.int64)
        if R == 0:
            return expert_outputs.new_zeros(T, H)
        if int(tok.min()) < 0 or int(tok.max()) >= T:
            raise ValueError(f"token_indices must lie in [0, {T}) (T = output_buffer.shape[0]), got values in "
                             f"[{int(tok.min())}, {int(tok.max())}]")
        counts = torch.bincount(tok, minlength=T)
        K = int(counts.max())                        # host sync: the width of the [T, K'] layout
        # slot of each row within its token (rows of one token keep their order)
        order = torch.sort(tok, stable=True).indices
        starts = torch.cumsum(counts, 0) - counts
        t_sorted = tok[order]
        slot = torch.arange(R, device=dev) - starts[t_sorted]
        pair_row = torch.full((T, K), R, dtype=torch.int64, device=dev)     # R: the appended zero row
        pair_row[t_sorted, slot] = order
        gates = sorted_gates.reshape(-1).float() if self.multiply_by_gates else \
            torch.ones(R, dtype=torch.float32, device=dev)
        weights = torch.zeros(T, K, dtype=torch.float32, device=dev)
        weights[t_sorted, slot] = gates[order].to(dev)
        rows = torch.cat([expert_outputs, expert_outputs.new_zeros(1, H)])
        return moe_combine(rows, pair_row.reshape(-1).to(torch.int32), weights, backend=self._backend)

    def extra_repr(self) -> str:
        return f"multiply_by_gates={self.multiply_by_gates}"
