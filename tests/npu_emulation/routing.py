"""Emulation of torch_npu's routing operators: init_routing_v2, token_unpermute, finalize_routing."""
from __future__ import annotations

import torch

INT32_MAX = 2 ** 31 - 1


def _check(op, ok, msg):
    if not ok:
        raise RuntimeError(f"{op} (emulated): {msg}")


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0,
                            expert_tokens_num_flag=False, quant_mode=0, active_expert_range=[],
                            row_idx_type=0):
    op = "npu_moe_init_routing_v2"
    # quant_mode defaults to 0 (static quantization), as in the schema of torch_npu 2.5.1-2.8
    if quant_mode != -1:
        raise NotImplementedError(f"{op} (emulated): quant_mode={quant_mode} is not emulated; float rows "
                                  "need quant_mode=-1 (the schema default 0 means static quantization)")
    _check(op, drop_pad_mode == 0, "only the dropless mode (drop_pad_mode=0) is emulated")
    _check(op, x.dim() == 2 and expert_idx.dim() == 2 and x.shape[0] == expert_idx.shape[0],
           "x [N, H] and expert_idx [N, K] expected")
    _check(op, expert_idx.dtype == torch.int32, f"expert_idx must be int32, got {expert_idx.dtype}")
    _check(op, 0 <= expert_num <= 10240, f"expert_num {expert_num} not in [0, 10240]")
    N, K = expert_idx.shape
    s, e = active_expert_range or [0, expert_num]
    key = expert_idx.reshape(-1).long().clone()
    key[key < s] = INT32_MAX
    o = torch.sort(key, stable=True).indices
    valid = (key >= s) & (key < e)
    A = int(valid.sum())
    if row_idx_type == 0:
        expanded_row_idx = torch.full((N * K,), -1, dtype=torch.int64)
        expanded_row_idx[o[:A]] = torch.arange(A)
    else:
        expanded_row_idx = o
    cnt = torch.bincount(key[o][:A] - s, minlength=e - s)
    if not expert_tokens_num_flag:
        expert_tokens = cnt.new_empty(0)
    elif expert_tokens_num_type == 0:
        expert_tokens = torch.cumsum(cnt, 0)
    elif expert_tokens_num_type == 1:
        expert_tokens = cnt
    else:
        nz = cnt.nonzero().flatten()
        expert_tokens = torch.stack((nz + s, cnt[nz]), dim=1)
    rows = N * K if active_num < 0 else min(active_num, N * K)
    expanded_x = torch.full((rows, x.shape[1]), float("nan"), dtype=x.dtype)   # rows past A: undefined
    n = min(rows, A)
    expanded_x[:n] = x[o[:n] // K]
    return expanded_x, expanded_row_idx.to(torch.int32), expert_tokens, x.new_empty(0, dtype=torch.float32)


def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    op = "npu_moe_token_unpermute"
    _check(op, not padded_mode, "padded_mode is not emulated")
    _check(op, probs is not None, "probs=None is not emulated")
    _check(op, sorted_indices.dtype == torch.int32 and sorted_indices.dim() == 1, "sorted_indices int32 [T*K]")
    _check(op, permuted_tokens.shape[0] == sorted_indices.numel(), "permuted_tokens must have T*K rows")
    _check(op, probs.dtype == permuted_tokens.dtype, "probs must have the tokens' dtype")
    T, K = probs.shape
    rows = permuted_tokens.float()[sorted_indices.long()].view(T, K, -1)
    return (rows * probs.float().unsqueeze(-1)).sum(1).to(permuted_tokens.dtype)


def npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                             expert_for_source_row, drop_pad_mode=0, release=(2, 7, 1)):
    op = "npu_moe_finalize_routing"
    if release < (2, 4):
        _check(op, None not in (skip1, skip2, bias, expert_for_source_row),
               "skip1, skip2, bias and expert_for_source_row are required before torch_npu 2.4.0")
    P = expanded_permuted_rows
    floats = [t for t in (P, skip1, skip2, bias, scales) if t is not None]
    _check(op, all(t.dtype == P.dtype for t in floats), "float inputs must share one dtype")
    _check(op, expanded_src_to_dst_row.dtype == torch.int32, "expanded_src_to_dst_row must be int32")
    N, K = scales.shape
    out = torch.zeros(N, P.shape[1], dtype=torch.float32)
    for t in (skip1, skip2):
        if t is not None:
            out += t.float()
    S = expanded_src_to_dst_row.long()
    for k in range(K):
        idx = S[k * N:(k + 1) * N] if drop_pad_mode in (0, 1) else S.view(N, K)[:, k]
        row = torch.where((idx == -1)[:, None], 0.0, P.float()[idx.clamp_min(0)])
        if bias is not None:
            row = row + bias.float()[expert_for_source_row[:, k].long()]
        out += scales[:, k].float()[:, None] * row
    return out.to(P.dtype)
