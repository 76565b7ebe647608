"""Shared experts (SPEC §3.5): a SwiGLU MLP every token goes through, optionally gated (Qwen2-MoE)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modes import resolve
from . import invariant


def shared_experts(x, shared_w13, shared_w2, shared_gate=None, deterministic=None):
    """SwiGLU MLP ``[2*I_s, H]`` / ``[H, I_s]``, optionally scaled by ``sigmoid(x @ shared_gate.T)``.
    ``deterministic``: batch-invariant GEMMs (None: the mode of the calling context)."""
    linear = invariant.linear if resolve(deterministic) else F.linear
    shared_w13, shared_w2 = shared_w13.to(x.dtype), shared_w2.to(x.dtype)  # as the routed experts do
    n = shared_w13.shape[0] // 2
    a = (F.silu(linear(x, shared_w13[:n]).float()) * linear(x, shared_w13[n:]).float()).to(x.dtype)
    y = linear(a, shared_w2)
    if shared_gate is not None:
        y = (y.float() * torch.sigmoid(linear(x.float(), shared_gate.float()))).to(x.dtype)
    return y
