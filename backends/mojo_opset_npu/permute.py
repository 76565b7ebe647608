"""moe_permute on ``torch_npu.npu_moe_init_routing_v2`` (dropless, token-major, stable).

The operator sorts the flat (token, slot) pairs ``p = t*K + j`` by expert with a stable sort, which
is the reference's order; its ``expanded_row_idx`` (row_idx_type 0) is our ``pair_row``.  It cannot
pad groups, so ``align > 1`` is done here on the device with no host synchronisation: each sorted
row moves down by the padding accumulated before its expert.
"""
from __future__ import annotations

import torch

from mojo_opset.contract.names import MOE_PERMUTE

from .platform import NpuOpImpl, missing_ops, torch_npu_module

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


def permute(x, topk_ids, num_experts, align):
    """The op contract's five outputs (int32 maps) from the operator, padded to ``align``."""
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


def routing_reasons(topk_ids) -> list[str]:
    """Why npu_moe_init_routing_v2 cannot take these ids (shared with the forward ops)."""
    out = missing_ops(ROUTING_OP, since="2.5.1")
    if topk_ids.dtype != torch.int32:
        out.append(f"topk_ids dtype {topk_ids.dtype}: npu_moe_init_routing_v2 takes int32 expert ids")
    if topk_ids.numel() == 0:
        out.append("T = 0: nothing to permute")
    if topk_ids.numel() >= 2 ** 31:
        out.append(f"T*K = {topk_ids.numel()} pairs: the operator's row indices are int32")
    return out


class NpuPermute(NpuOpImpl):
    op = MOE_PERMUTE
    dtypes = FLOAT_DTYPES
    options = frozenset({"align"})      # padding is applied after the operator
    limits = {"num_experts": MAX_EXPERTS}

    def extra_reasons(self, call):
        return routing_reasons(call.topk_ids)

    def forward(self, call):
        return torch.ops.mojo_npu.permute(call.x, call.topk_ids, call.num_experts, call.align)
