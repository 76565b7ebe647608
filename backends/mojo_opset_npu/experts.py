"""moe_experts on ``torch_npu.npu_grouped_matmul`` + ``npu_swiglu`` (grouped SwiGLU experts).

Both GEMMs take the expert-sorted rows as one tensor split by ``group_list`` (our inclusive
``group_ends``, group_list_type 0) and the weights as transposed views ``[E, in, out]``, which the
operator accepts without a copy.  Groups need no alignment.  Rows past the last group are
undefined in the operator's output and are zeroed here, as the op contract requires.
"""
from __future__ import annotations

import torch
from mojo_opset.backend import OpImpl

from .runtime import device_reason, missing_ops, torch_npu_module, version_tuple

GMM_OP = "npu_grouped_matmul"
SWIGLU_OP = "npu_swiglu"
MAX_GROUPS = 1024
MAX_LAST_DIM = 65535
GEMM_DTYPES = (torch.float16, torch.bfloat16)
TENSOR_GROUP_LIST_SINCE = (2, 5, 1)   # op-plugin 7.0.0; earlier releases take group_list as host ints


def grouped_matmul_reasons() -> list[str]:
    out = missing_ops(GMM_OP, since="2.5.1")
    if not out and version_tuple() < TENSOR_GROUP_LIST_SINCE:
        out.append(f"torch_npu {'.'.join(map(str, version_tuple()))}: npu_grouped_matmul takes a device "
                   "group_list (no host sync) from torch_npu 2.5.1")
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


@torch.library.custom_op("mojo_npu::experts", mutates_args=())
def experts_kernel(permuted_x: torch.Tensor, group_ends: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor) -> torch.Tensor:
    y = swiglu_experts(permuted_x, group_ends, w13, w2)
    valid = torch.arange(y.shape[0], device=y.device) < group_ends[-1]
    return torch.where(valid[:, None], y, y.new_zeros(()))


@experts_kernel.register_fake
def _(permuted_x, group_ends, w13, w2):
    return permuted_x.new_empty((permuted_x.shape[0], w2.shape[1]))


def experts_reasons(x, w13, w2, activation, x_name="permuted_x") -> list[str]:
    """Why the grouped-matmul chain cannot take this call (shared with moe_forward)."""
    out = grouped_matmul_reasons() + missing_ops(SWIGLU_OP, since="2.5.1")
    for name, t in ((x_name, x), ("w13", w13), ("w2", w2)):
        r = device_reason(name, t)
        if r:
            out.append(r)
    if activation != "swiglu":
        out.append(f"activation {activation!r}: only swiglu is implemented")
    if x.dtype not in GEMM_DTYPES:
        out.append(f"{x_name} dtype {x.dtype}: the grouped-matmul path serves fp16 and bf16")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        out.append(f"expert weights ({w13.dtype}, {w2.dtype}) differ from {x_name} ({x.dtype}); "
                   "the backend does not cast weights per call")
    if not (w13.is_contiguous() and w2.is_contiguous()):
        out.append("w13/w2 are not contiguous; the backend does not copy expert weights per call")
    E, N, H = w13.shape
    if E > MAX_GROUPS:
        out.append(f"E = {E} experts: npu_grouped_matmul takes at most {MAX_GROUPS} groups")
    if max(N, H) > MAX_LAST_DIM:
        out.append(f"a GEMM dimension of {max(N, H)}: npu_grouped_matmul needs every last dim < 65536")
    if x.shape[0] == 0:
        out.append("no rows: nothing to compute")
    return out


class NpuExperts(OpImpl):
    op = "moe_experts"
    supports_autograd = False
    required_alignment = 1  # group_list takes any group sizes

    def reasons(self, permuted_x, group_ends, w13, w2, activation="swiglu", **_):
        out = experts_reasons(permuted_x, w13, w2, activation)
        if group_ends is not None and group_ends.dtype not in (torch.int32, torch.int64):
            out.append(f"group_ends dtype {group_ends.dtype}: expected int32")
        return out

    def cache_key(self, permuted_x, group_ends, w13, w2, activation="swiglu", **_):
        return (permuted_x.device.type, permuted_x.dtype, permuted_x.shape[0] == 0, w13.device.type,
                w2.device.type, w13.dtype, w2.dtype, tuple(w13.shape), w13.is_contiguous(), w2.is_contiguous(), activation,
                None if group_ends is None else group_ends.dtype)

    def forward(self, permuted_x, group_ends, w13, w2, activation="swiglu", **_):
        return experts_kernel(permuted_x, group_ends, w13, w2)
