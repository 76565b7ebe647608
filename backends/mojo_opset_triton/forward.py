"""moe_forward: the fused MoE forward, align -> up GEMM (gather + SwiGLU) -> down GEMM (router weight)
-> combine, its launcher and OpImpl (one token: matrix-vector kernels, no align, the combine inside
the down projection, see decode_kernel.py).  Training calls go
through ``custom_ops.fused_moe_autograd`` (forward saving the pre-activation, backward in ``training.py``)."""
from __future__ import annotations

import torch

from mojo_opset.contract.names import MOE_FORWARD

from .align_kernel import MAX_EXPERTS, row_blocks
from .combine_kernel import sum_pairs
from .configs import deterministic_config, get_config
from .decode_kernel import down_combine_gemv, gemv_ready, up_gemv
from .experts_kernel import down_proj, up_proj
from .pdl import pdl_on
from .platform import TritonOpImpl, eager


def kernel_flags(x: torch.Tensor) -> tuple[bool, bool]:
    """(upcast, ieee): bf16 dots are wrong in the interpreter, so upcast there; fp32 stays exact."""
    upcast = x.device.type == "cpu" and x.dtype == torch.bfloat16
    return upcast, x.dtype == torch.float32 or upcast


def compact_shift(tokens_per_expert, group_ends, block_m):
    """Per expert, padded group start minus compact group start: padded row - shift = compact row."""
    padded = (tokens_per_expert + block_m - 1) // block_m * block_m
    return ((group_ends - padded) - (torch.cumsum(tokens_per_expert, 0) - tokens_per_expert)).to(torch.int32)


def fused_moe_forward(x, topk_ids, topk_weights, w13, w2, cfg=None, save_h=False, deterministic=False):
    """Routed-expert output [T, H] in x's dtype; no host synchronisation.

    ``save_h`` (training): returns ``(out, h)`` with the pre-activation ``h = x W13^T`` [T*K, 2I] in
    compact expert-sorted rows (the backward's layout, see train_kernel.py).  ``deterministic``:
    one tile configuration whatever T (batch-invariant rows; every other step already is)."""
    T, H = x.shape
    K = topk_ids.shape[1]
    E, I = w13.shape[0], w13.shape[1] // 2
    P = T * K
    if T == 0:
        out = x.new_empty(0, H)
        return (out, x.new_empty(0, 2 * I)) if save_h else out
    cfg = cfg or (deterministic_config(x) if deterministic else get_config(x, T, E, H, I, K))
    ids = topk_ids.to(torch.int32).contiguous()
    w_flat = topk_weights.to(torch.float32).contiguous().view(-1)
    pdl = pdl_on(x)
    if T == 1 and cfg.get("gemv") and not (save_h or deterministic) and gemv_ready(x, w13, w2):
        return _decode_forward(x, ids, w_flat, w13, w2, cfg["gemv"], pdl)
    bm = cfg["BLOCK_M"]
    upcast, ieee = kernel_flags(x)
    rowdot = deterministic and x.device.type == "cpu"     # the interpreter's tl.dot is not row-invariant
    h = torch.empty(P, 2 * I, dtype=x.dtype, device=x.device) if save_h else None
    # one token: a row block per pair, no align launch (a tenth of a decode step)
    pair_rows = T == 1 and not (save_h or deterministic)
    R, row_src, block_expert, tpe, ends = row_blocks(ids, E, bm, pair_rows, pdl)
    inter = torch.empty(R, I, dtype=x.dtype, device=x.device)
    up_proj(x, w13, inter, row_src, block_expert, K, dict(cfg["up"], BLOCK_M=bm), upcast, ieee,
            h=h, h_shift=compact_shift(tpe, ends, bm) if save_h else None, rowdot=rowdot, pair_rows=pair_rows,
            pdl=pdl)
    out = _down_and_combine(inter, w2, row_src, block_expert, ids, w_flat, T, E, cfg, upcast, ieee, rowdot,
                            pair_rows, pdl)
    return (out, h) if save_h else out


def _decode_forward(x, ids, w_flat, w13, w2, gemv_cfg, pdl):
    """One token: an intermediate row per pair, then the down projection and the combine in one launch."""
    K, I = ids.shape[1], w13.shape[1] // 2
    inter = torch.empty(K, I, dtype=x.dtype, device=x.device)
    up_gemv(x, w13, inter, ids, K, gemv_cfg["up"], pdl)
    out = torch.empty(1, x.shape[1], dtype=x.dtype, device=x.device)
    down_combine_gemv(inter, w2, out, ids, w_flat, K, gemv_cfg["down"], pdl)
    return out


def _down_and_combine(inter, w2, row_src, block_expert, ids, w_flat, T, E, cfg, upcast, ieee, rowdot=False,
                      pair_rows=False, pdl=False):
    """``w_flat``: the router weights as flat fp32 ``[T*K]``."""
    K, H, dt, dev = ids.shape[1], w2.shape[1], inter.dtype, inter.device
    bm = cfg["BLOCK_M"]
    down_cfg = dict(cfg["down"], BLOCK_M=bm)
    if K == 1:
        out = torch.zeros(T, H, dtype=dt, device=dev)   # ids out of range leave zeros
        down_proj(inter, w2, out, row_src, block_expert, w_flat, K, down_cfg, upcast, ieee, True, rowdot, pair_rows,
                  pdl)
        return out
    y_pairs = torch.empty(T * K, H, dtype=dt, device=dev)
    down_proj(inter, w2, y_pairs, row_src, block_expert, w_flat, K, down_cfg, upcast, ieee, False, rowdot, pair_rows,
              pdl)
    return sum_pairs(y_pairs, ids, E, dt, pdl)


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


class ForwardImpl(TritonOpImpl):
    """Fused experts; differentiable through the backend's backward."""

    op = MOE_FORWARD
    options = frozenset({"deterministic"})
    supports_autograd = True
    deterministic_backward = False     # its backward's tiles follow T: deterministic training runs the reference
    limits = {"num_experts": MAX_EXPERTS}

    def extra_reasons(self, call):
        out = super().extra_reasons(call)
        x, w13, w2 = call.x, call.w13, call.w2
        if w13.dtype != x.dtype or w2.dtype != x.dtype:
            out.append(f"expert weights ({_dtype_name(w13.dtype)}, {_dtype_name(w2.dtype)}) must have x's dtype "
                       f"{_dtype_name(x.dtype)}")
        if call.topk_ids.dtype.is_floating_point:
            out.append("topk_ids must be an integer tensor")
        return out

    def forward(self, call):
        from .custom_ops import fused_moe_autograd

        args = (call.x, call.topk_ids, call.topk_weights, call.w13, call.w2)
        if call.deterministic:     # no gradient here (see deterministic_backward)
            if eager():
                return fused_moe_forward(*args, deterministic=True)
            return torch.ops.mojo_triton.fused_moe_deterministic(*args)
        if eager() and not call.needs_grad():
            return fused_moe_forward(*args)
        return fused_moe_autograd(*args)
