"""Emulation of torch_npu.npu_grouped_matmul (the single-tensor MoE form) and npu_swiglu."""
from __future__ import annotations

import torch
import torch.nn.functional as F

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check(ok, msg, op="npu_grouped_matmul"):
    if not ok:
        raise RuntimeError(f"{op} (emulated): {msg}")


def _counts(group_list, group_list_type):
    _check(isinstance(group_list, torch.Tensor) and group_list.dtype == torch.int64 and group_list.dim() == 1,
           "group_list must be a 1-D int64 tensor")
    return group_list if group_list_type == 1 else torch.diff(group_list, prepend=group_list.new_zeros(1))


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, output_dtype=None, tuning_config=None, release=(2, 7, 1)):
    _check(release >= (2, 5, 1), "a tensor group_list needs torch_npu >= 2.5.1 (earlier: a list of ints)")
    _check(len(x) == 1 and len(weight) == 1, "the MoE form takes x=[X] and weight=[W]")
    _check(split_item in (2, 3) and group_type == 0, "the MoE form needs split_item 2/3 and group_type 0")
    _check(bias is None and offset is None and antiquant_offset is None and act_type == 0,
           "bias / offsets / act_type are not emulated")
    X, W = x[0], weight[0]
    _check(X.dim() == 2 and W.dim() == 3 and X.shape[1] == W.shape[1], "X [M, K] and W [E, K, N] expected")
    _check(X.is_contiguous(), "a transposed x is not allowed")
    E, K, N = W.shape
    _check(E <= 1024, f"{E} groups > 1024")
    _check(K < 65536 and N < 65536, "every last dim must be < 65536")
    counts = _counts(group_list, group_list_type)
    _check(counts.numel() == E, f"group_list has {counts.numel()} groups for {E} weights")
    ends = torch.cumsum(counts, 0).tolist()
    _check(ends[-1] <= X.shape[0], "group_list covers more rows than x has")

    if X.dtype == torch.int8:
        _check(W.dtype == torch.int8, "int8 x needs int8 weights")
        if output_dtype == torch.int32:
            out_dtype, sc = torch.int32, None
        else:
            _check(scale is not None and per_token_scale is not None, "int8 x needs scale and per_token_scale")
            sc, pts = scale[0], per_token_scale[0]
            _check(tuple(sc.shape) == (E, N) and sc.dtype in (torch.bfloat16, torch.float32), "scale [E, N] bf16/fp32")
            _check(pts.dtype == torch.float32 and tuple(pts.shape) == (X.shape[0],), "per_token_scale fp32 [M]")
            out_dtype = torch.bfloat16 if sc.dtype == torch.bfloat16 else torch.float16
            _check(output_dtype in (None, out_dtype), f"output_dtype {output_dtype} with a {sc.dtype} scale")
    else:
        _check(X.dtype in FLOATS, f"x dtype {X.dtype}")
        out_dtype = X.dtype
        if antiquant_scale is not None:
            _check(W.dtype == torch.int8, "antiquant (weight-only) expects int8 weights here")
            aqs = antiquant_scale[0]
            _check(tuple(aqs.shape) == (E, N) and aqs.dtype == X.dtype, "antiquant_scale [E, N] in x's dtype")
        else:
            _check(W.dtype == X.dtype, f"weight dtype {W.dtype} != x dtype {X.dtype}")

    garbage = 12345 if out_dtype == torch.int32 else float("nan")   # rows past the groups: undefined
    Y = torch.full((X.shape[0], N), garbage, dtype=out_dtype)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            xs = X[start:end]
            if X.dtype == torch.int8:
                acc = (xs.long() @ W[e].long())
                Y[start:end] = (acc.to(torch.int32) if sc is None else
                                (acc.float() * sc[e].float() * pts[start:end, None]).to(out_dtype))
            else:
                w = W[e] if antiquant_scale is None else (W[e].float() * aqs[e].float()).to(X.dtype)
                Y[start:end] = (xs.float() @ w.float()).to(out_dtype)
        start = end
    return [Y]


def npu_swiglu(input, dim=-1):
    if not input.is_contiguous():
        raise RuntimeError("npu_swiglu (emulated): input must be contiguous")
    a, b = input.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(input.dtype)
