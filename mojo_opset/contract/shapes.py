"""Empty outputs shaped by the op contract (calls.py): what a backend's fake/meta implementation
returns for ``torch.compile``, written once here so every backend agrees with it."""
from __future__ import annotations

import torch



def padded_rows(num_pairs: int, num_experts: int, align: int) -> int:
    """Rows of the permuted buffer: every pair, plus the worst-case padding when align > 1."""
    return num_pairs if align == 1 else num_pairs + num_experts * (align - 1)


def gating_outputs(logits: torch.Tensor, top_k: int):
    """(topk_ids int32 [T, K], topk_weights fp32 [T, K], scores fp32 [T, E])."""
    T, E = logits.shape
    return (logits.new_empty(T, top_k, dtype=torch.int32), logits.new_empty(T, top_k, dtype=torch.float32),
            logits.new_empty(T, E, dtype=torch.float32))


def permute_outputs(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, align: int):
    """(permuted_x [R, H], tokens_per_expert [E], group_ends [E], row_src [R], pair_row [T*K]), int32 maps."""
    P = topk_ids.shape[0] * topk_ids.shape[1]
    R = padded_rows(P, num_experts, align)
    i32 = torch.int32
    return (x.new_empty(R, x.shape[1]), x.new_empty(num_experts, dtype=i32), x.new_empty(num_experts, dtype=i32),
            x.new_empty(R, dtype=i32), x.new_empty(P, dtype=i32))


def combine_output(expert_out: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[T, H] in expert_out's dtype."""
    return expert_out.new_empty(num_tokens, expert_out.shape[1])
