"""moe_permute on ``torch_npu.npu_moe_init_routing_v2`` (dropless, token-major, stable).

The operator sorts the flat (token, slot) pairs ``p = t*K + j`` by expert with a stable sort, which
is the reference's order; its ``expanded_row_idx`` (row_idx_type 0) is our ``pair_row``.  It cannot
pad groups, so ``align > 1`` is done here on the device with no host synchronisation: each sorted
row moves down by the padding accumulated before its expert.
"""
from __future__ import annotations

import torch
from mojo_opset.backend import OpImpl

from .runtime import device_reason, missing_ops, torch_npu_module

ROUTING_OP = "npu_moe_init_routing_v2"
MAX_EXPERTS = 10240
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def init_routing(x, topk_ids, num_experts):
    """``(sorted rows [T*K, H], pair_row int64 [T*K], tokens_per_expert int64 [E])``."""
    npu = torch_npu_module()
    P = topk_ids.numel()
    rows, pair_row, counts, _ = npu.npu_moe_init_routing_v2(
        x.contiguous(), topk_ids.contiguous(), active_num=P, expert_num=num_experts, drop_pad_mode=0,
        expert_tokens_num_type=1, expert_tokens_num_flag=True,
        quant_mode=-1,  # explicit: the schema default of torch_npu 2.5.1-2.8 is 0 (static quant)
        active_expert_range=[0, num_experts], row_idx_type=0)
    return rows, pair_row.long(), counts.long()


def pad_groups(rows, pair_row, counts, topk_ids, align):
    """Spread the sorted rows so each expert's group starts at a multiple of ``align``."""
    P, H = rows.shape
    E = counts.shape[0]
    dev = rows.device
    padded = (counts + align - 1) // align * align
    ends = torch.cumsum(padded, 0)
    shift = (ends - padded) - (torch.cumsum(counts, 0) - counts)        # padding before each expert
    row_src = torch.empty(P, dtype=torch.int64, device=dev)
    row_src[pair_row] = torch.arange(P, device=dev)
    expert_of_row = topk_ids.reshape(-1).long()[row_src]
    dest = torch.arange(P, device=dev) + shift[expert_of_row]
    R = P + E * (align - 1)
    out = rows.new_zeros(R, H)
    out[dest] = rows
    src = torch.full((R,), -1, dtype=torch.int64, device=dev)
    src[dest] = row_src
    return out, ends, src, dest[pair_row]


@torch.library.custom_op("mojo_npu::permute", mutates_args=())
def permute_kernel(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                   align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, pair_row, counts = init_routing(x, topk_ids, num_experts)
    if align == 1:
        P = pair_row.shape[0]
        row_src = torch.empty(P, dtype=torch.int64, device=x.device)
        row_src[pair_row] = torch.arange(P, device=x.device)
        ends = torch.cumsum(counts, 0)
    else:
        rows, ends, row_src, pair_row = pad_groups(rows, pair_row, counts, topk_ids, align)
    return (rows, counts.to(torch.int32), ends.to(torch.int32), row_src.to(torch.int32),
            pair_row.to(torch.int32))


@permute_kernel.register_fake
def _(x, topk_ids, num_experts, align):
    P = topk_ids.numel()
    R = P if align == 1 else P + num_experts * (align - 1)
    i32 = dict(dtype=torch.int32)
    return (x.new_empty((R, x.shape[1])), x.new_empty((num_experts,), **i32), x.new_empty((num_experts,), **i32),
            x.new_empty((R,), **i32), x.new_empty((P,), **i32))


def routing_reasons(x, topk_ids, num_experts) -> list[str]:
    """Why npu_moe_init_routing_v2 cannot take this call (shared with moe_forward)."""
    out = missing_ops(ROUTING_OP, since="2.5.1")
    for name, t in (("x", x), ("topk_ids", topk_ids)):
        r = device_reason(name, t)
        if r:
            out.append(r)
    if x.dtype not in FLOAT_DTYPES:
        out.append(f"x dtype {x.dtype}: npu_moe_init_routing_v2 takes fp16, bf16 or fp32 rows")
    if topk_ids.dtype != torch.int32:
        out.append(f"topk_ids dtype {topk_ids.dtype}: npu_moe_init_routing_v2 takes int32 expert ids")
    if topk_ids.numel() == 0:
        out.append("T = 0: nothing to permute")
    if topk_ids.numel() >= 2 ** 31:
        out.append(f"T*K = {topk_ids.numel()} pairs: the operator's row indices are int32")
    if num_experts > MAX_EXPERTS:
        out.append(f"E = {num_experts} experts: npu_moe_init_routing_v2 supports at most {MAX_EXPERTS}")
    return out


class NpuPermute(OpImpl):
    op = "moe_permute"
    supports_autograd = False

    def reasons(self, x, topk_ids, num_experts, align=1, **_):
        return routing_reasons(x, topk_ids, num_experts)

    def cache_key(self, x, topk_ids, num_experts, align=1, **_):
        return (x.device.type, x.dtype, topk_ids.device.type, topk_ids.dtype, topk_ids.numel() == 0,
                topk_ids.numel() >= 2 ** 31, num_experts)

    def forward(self, x, topk_ids, num_experts, align=1, **_):
        return permute_kernel(x, topk_ids, int(num_experts), int(align))
