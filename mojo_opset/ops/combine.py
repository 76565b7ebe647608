"""Combine (unpermute): the weighted sum of each token's expert outputs, accumulated in fp32."""
from __future__ import annotations

import torch


def combine_reference(expert_out, pair_row, topk_weights, num_tokens):
    T, K = num_tokens, topk_weights.shape[1]
    rows = expert_out[pair_row.long()].view(T, K, expert_out.shape[-1]).float()
    return (rows * topk_weights.float().unsqueeze(-1)).sum(dim=1).to(expert_out.dtype)
