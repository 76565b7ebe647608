"""Emulation of torch_npu's dynamic int8 quantization operators."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _int8(v, s):
    # NaN/Inf handling of the operators is undocumented: the emulation maps non-finite codes to 0
    return torch.nan_to_num(torch.round(v / s.unsqueeze(-1)), nan=0.0, posinf=0.0, neginf=0.0).to(torch.int8)


def npu_dynamic_quant(x, *, smooth_scales=None, group_index=None, dst_type=None):
    if x.dtype not in (torch.float16, torch.bfloat16) or x.dim() < 2:
        raise RuntimeError(f"npu_dynamic_quant (emulated): x must be fp16/bf16 with ndim > 1, got {x.dtype}")
    if smooth_scales is not None or group_index is not None or dst_type not in (None, torch.int8):
        raise NotImplementedError("npu_dynamic_quant (emulated): smoothing and other outputs are not emulated")
    xf = x.float()
    scale = xf.abs().amax(-1) / 127
    return _int8(xf, scale), scale


def npu_dequant_swiglu_quant(x, *, weight_scale=None, activation_scale=None, bias=None, quant_scale=None,
                             quant_offset=None, group_index=None, activate_left=False, quant_mode=0, **_):
    op = "npu_dequant_swiglu_quant (emulated)"
    if x.dtype != torch.int32 or bias is not None or quant_scale is not None or quant_offset is not None:
        raise NotImplementedError(f"{op}: only int32 x without bias / static quant parameters is emulated")
    if quant_mode != 1:
        raise NotImplementedError(f"{op}: only dynamic quantization (quant_mode=1) is emulated")
    counts = group_index                                  # COUNT mode
    if counts.dtype != torch.int64 or counts.numel() != weight_scale.shape[0]:
        raise RuntimeError(f"{op}: group_index must be int64 counts [E]")
    M = x.shape[0]
    expert = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    n = expert.numel()
    xf = x[:n].float() * weight_scale.float()[expert] * activation_scale.float()[:n, None]
    left, right = xf.chunk(2, dim=-1)
    h = F.silu(left) * right if activate_left else F.silu(right) * left
    s = h.abs().amax(-1) / 127
    out = torch.full((M, h.shape[1]), 99, dtype=torch.int8)           # rows past the groups: undefined
    scale = torch.full((M,), float("nan"))
    out[:n], scale[:n] = _int8(h, s), s
    return out, scale
