"""Emulation of torch_npu.npu_moe_gating_top_k, from its documented semantics and constraints."""
from __future__ import annotations

import torch


def _check(ok, msg):
    if not ok:
        raise RuntimeError(f"npu_moe_gating_top_k (emulated): {msg}")


def npu_moe_gating_top_k(x, k, *, bias=None, k_group=1, group_count=1, group_select_mode=0, renorm=0,
                         norm_type=0, out_flag=False, routed_scaling_factor=1.0, eps=1e-20, release=(2, 7, 1)):
    _check(x.dim() == 2, f"x must be 2-D, got {tuple(x.shape)}")
    T, E = x.shape
    _check(E <= 2048, f"E = {E} > 2048")
    _check(E % group_count == 0 and E // group_count > 2, f"E = {E} with group_count {group_count}")
    _check(1 <= k_group <= group_count, f"k_group {k_group} not in [1, {group_count}]")
    _check(1 <= k <= E // group_count * k_group, f"k = {k} out of range")
    _check(renorm == 0, "renorm must be 0")
    _check(norm_type in (0, 1) and group_select_mode in (0, 1), "norm_type / group_select_mode must be 0 or 1")
    if bias is not None:
        _check(tuple(bias.shape) == (E,) and bias.dtype == x.dtype, "bias must be [E] in x's dtype")
    if release < (2, 7):
        _check(E == 256 and group_count == 8 and k_group == 4 and bias is not None,
               "this release supports only E = 256, 8 groups / 4 kept, with bias")
    s = torch.softmax(x.float(), -1) if norm_type == 0 else torch.sigmoid(x.float())
    sel = s if bias is None else s + bias.float()
    if group_count > 1:
        g = sel.view(T, group_count, E // group_count)
        gscore = g.max(-1).values if group_select_mode == 0 else g.topk(2, dim=-1).values.sum(-1)
        keep = torch.sort(-gscore, dim=-1, stable=True).indices[:, :k_group]
        gmask = torch.zeros(T, group_count, dtype=torch.bool).scatter_(1, keep, True)
        sel = sel.masked_fill(~gmask.repeat_interleave(E // group_count, dim=1), float("-inf"))
    idx = torch.sort(-sel, dim=-1, stable=True).indices[:, :k]    # ties -> lower index
    y = s.gather(1, idx)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    y = (y * routed_scaling_factor).to(x.dtype)
    return y, idx.to(torch.int32), s if out_flag else s.new_empty(0)
