"""moe_experts on ``torch_npu.npu_grouped_matmul`` + ``npu_swiglu`` (grouped SwiGLU experts).

Both GEMMs take the expert-sorted rows as one tensor split by ``group_list`` (our inclusive
``group_ends``, group_list_type 0) and the weights as transposed views ``[E, in, out]``, which the
operator accepts without a copy.  Groups need no alignment.  Rows past the last group are
undefined in the operator's output and are zeroed here, as the op contract requires.
"""
from __future__ import annotations

import torch

from mojo_opset.contract.names import MOE_EXPERTS

from .platform import NpuOpImpl, missing_ops, release, torch_npu_module, version_tuple

GMM_OP = "npu_grouped_matmul"
SWIGLU_OP = "npu_swiglu"
MAX_GROUPS = 1024
MAX_LAST_DIM = 65535
GEMM_DTYPES = (torch.float16, torch.bfloat16)
TENSOR_GROUP_LIST_SINCE = (2, 5, 1)   # op-plugin 7.0.0; earlier releases take group_list as host ints
# what the grouped-matmul chain can take: at most 1024 groups, every GEMM's last dim < 65536
# (w13 [E, 2I, H] and w2 [E, H, I]: H <= 65535 and 2I <= 65535)
GMM_LIMITS = {"num_experts": MAX_GROUPS, "hidden_size": MAX_LAST_DIM, "intermediate_size": MAX_LAST_DIM // 2}


def grouped_matmul_reasons() -> list[str]:
    out = missing_ops(GMM_OP, since="2.5.1")
    if not out and version_tuple() < TENSOR_GROUP_LIST_SINCE:
        out.append(f"torch_npu {release()}: npu_grouped_matmul takes a device group_list (no host sync) from "
                   "torch_npu 2.5.1")
    return out


def grouped_matmul(npu, x, w_t, group_ends):
    """``Y[rows of e] = X[rows of e] @ w_t[e]`` with ``w_t`` ``[E, in, out]``."""
    return npu.npu_grouped_matmul([x], [w_t], group_list=group_ends.long(), split_item=2, group_type=0,
                                  group_list_type=0)[0]


def swiglu_experts(permuted_x, group_ends, w13, w2):
    npu = torch_npu_module()
    h = grouped_matmul(npu, permuted_x.contiguous(), w13.transpose(1, 2), group_ends)
    a = npu.npu_swiglu(h, dim=-1)                  # silu(first half = gate) * second half (= up)
    return grouped_matmul(npu, a, w2.transpose(1, 2), group_ends)


def experts(permuted_x, group_ends, w13, w2):
    """The op contract's output: rows past ``group_ends[-1]`` zeroed."""
    y = swiglu_experts(permuted_x, group_ends, w13, w2)
    valid = torch.arange(y.shape[0], device=y.device) < group_ends[-1]
    return torch.where(valid[:, None], y, y.new_zeros(()))


def experts_reasons(x, w13, w2, x_name="permuted_x") -> list[str]:
    """Why the grouped-matmul chain cannot take these float experts (shared with moe_forward)."""
    out = grouped_matmul_reasons() + missing_ops(SWIGLU_OP, since="2.5.1")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        out.append(f"expert weights ({w13.dtype}, {w2.dtype}) differ from {x_name} ({x.dtype}); "
                   "the backend does not cast weights per call")
    if not (w13.is_contiguous() and w2.is_contiguous()):
        out.append("w13/w2 are not contiguous; the backend does not copy expert weights per call")
    if x.shape[0] == 0:
        out.append("no rows: nothing to compute")
    return out


class NpuExperts(NpuOpImpl):
    op = MOE_EXPERTS
    dtypes = GEMM_DTYPES        # SwiGLU only: ``activation`` is not declared
    limits = GMM_LIMITS
    required_alignment = 1      # group_list takes any group sizes

    def extra_reasons(self, call):
        return experts_reasons(call.permuted_x, call.w13, call.w2)

    def forward(self, call):
        return torch.ops.mojo_npu.experts(call.permuted_x, call.group_ends, call.w13, call.w2)
