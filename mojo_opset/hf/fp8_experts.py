"""DeepSeek-V3 / R1 fp8 routed experts from a Hugging Face state dict, straight into
:class:`mojo_opset.QuantizedExperts` (scheme ``w8a8_fp8_block``), without dequantizing.

The checkpoint stores, per expert ``e`` under a block prefix such as ``model.layers.3.mlp.``,
``experts.{e}.{gate_proj,up_proj,down_proj}.weight`` in float8_e4m3fn ``[out, in]`` and
``....weight_scale_inv`` ``[ceil(out/128), ceil(in/128)]``: despite its name a multiplier
(dequantized = weight x weight_scale_inv), which is exactly the scale convention of
``QuantizedExperts``.  The codes are copied byte for byte; gate rows come before up rows in w13, and
because I is a multiple of 128 their block-scale grids concatenate along rows.
"""
from __future__ import annotations

import re

import torch

from ..quant import QuantizedExperts
from ..validation import fail

_PROJ = ("gate_proj", "up_proj", "down_proj")


def _expert_ids(state_dict, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"experts\.(\d+)\.gate_proj\.weight$")
    return sorted({int(m.group(1)) for k in state_dict for m in [pat.match(k)] if m})


def _take(state_dict, key: str, dtypes: tuple, what: str) -> torch.Tensor:
    if key not in state_dict:
        fail(f"state_dict has no {key!r} ({what})", KeyError)
    t = state_dict[key]
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or t.dim() != 2:
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        fail(f"{key!r} must be a 2-D {' or '.join(str(d).replace('torch.', '') for d in dtypes)} tensor "
             f"({what}), got {got}", TypeError)
    return t


def load_fp8_experts(state_dict, prefix: str, experts=None, device=None) -> QuantizedExperts:
    """The routed experts of one DeepSeek-V3-style fp8 MoE block as a ``w8a8_fp8_block``
    :class:`QuantizedExperts`.

    ``prefix``: the block's prefix (``"model.layers.3.mlp."``; a missing trailing dot is added).
    ``experts``: the expert ids to load, in order (default: all the checkpoint holds, which must be
    0..E-1); with expert parallelism pass the rank's range.  ``device``: where the stacked tensors go
    (default: the checkpoint tensors' device); each expert's tensors are copied there once."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    ids = list(experts) if experts is not None else _expert_ids(state_dict, prefix)
    if not ids:
        fail(f"state_dict has no '{prefix}experts.<e>.gate_proj.weight' tensors", KeyError)
    if experts is None and ids != list(range(len(ids))):
        fail(f"the experts under {prefix!r} are not numbered 0..{len(ids) - 1} (found {ids[:8]}...); "
             "pass experts= explicitly", ValueError)

    def tensors(e):
        out = []
        for p in _PROJ:
            base = f"{prefix}experts.{e}.{p}."
            w = _take(state_dict, base + "weight", (torch.float8_e4m3fn,), "fp8 codes")
            s = _take(state_dict, base + "weight_scale_inv", (torch.float32, torch.bfloat16, torch.float16),
                      "128x128 block scales")
            want = (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
            if tuple(s.shape) != want:
                fail(f"{base + 'weight_scale_inv'!r} must have shape {list(want)} for a weight of shape "
                     f"{list(w.shape)} (128x128 blocks), got {list(s.shape)}")
            out.append((w, s))
        return out

    first = tensors(ids[0])
    (g, gs), (_u, _us), (d, ds) = first
    I, H = g.shape
    if I % 128:
        fail(f"the experts' intermediate size I = {I} must be a multiple of 128 for 128x128 fp8 blocks "
             "(no block may span w13's gate and up halves)")
    dev = torch.device(device) if device is not None else g.device
    E = len(ids)
    w13_q = torch.empty(E, 2 * I, H, dtype=torch.float8_e4m3fn, device=dev)
    w2_q = torch.empty(E, H, I, dtype=torch.float8_e4m3fn, device=dev)
    w13_s = torch.empty(E, 2 * gs.shape[0], gs.shape[1], dtype=torch.float32, device=dev)
    w2_s = torch.empty(E, ds.shape[0], ds.shape[1], dtype=torch.float32, device=dev)
    for i, e in enumerate(ids):
        (g, gs), (u, us), (d, ds) = first if i == 0 else tensors(e)
        for name, t, shape in (("gate_proj", g, (I, H)), ("up_proj", u, (I, H)), ("down_proj", d, (H, I))):
            if tuple(t.shape) != shape:
                fail(f"{prefix}experts.{e}.{name}.weight has shape {list(t.shape)}, expected {list(shape)} "
                     f"(from expert {ids[0]})")
        w13_q[i, :I].copy_(g)
        w13_q[i, I:].copy_(u)
        w2_q[i].copy_(d)
        w13_s[i, :gs.shape[0]].copy_(gs)
        w13_s[i, gs.shape[0]:].copy_(us)
        w2_s[i].copy_(ds)
    return QuantizedExperts.from_tensors("w8a8_fp8_block", w13_q, w13_s, w2_q, w2_s)
