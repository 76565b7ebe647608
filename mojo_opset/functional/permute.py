"""``moe_permute`` (SPEC §3.2): order the (token, slot) pairs by expert, optionally aligned."""
from __future__ import annotations

from ..contract.calls import PermuteCall
from ..dispatch import dispatch
from ..reference.permute import permute_reference
from ..validation import FLOAT_DTYPES, check_int, check_tensor
from .checks import validate_align, validate_topk_ids


def permute_reference_call(call: PermuteCall):
    return permute_reference(call.x, call.topk_ids, call.num_experts, call.align)


def permute(call: PermuteCall, backend=None):
    return dispatch(call, permute_reference_call, backend=backend)[0]


def moe_permute(x, topk_ids, num_experts, *, align=1, backend=None):
    """Rows of ``x [T, H]`` ordered by expert for ``topk_ids [T, K]`` (stable in token, then slot).

    Returns ``(permuted_x [R, H], tokens_per_expert int32 [E], group_ends int32 [E], row_src int32
    [R], pair_row int32 [T*K])``; with ``align > 1`` each expert's group is padded with zero rows to
    a multiple of ``align`` and R is the worst case ``T*K + E*(align-1)`` (no host sync).  See
    :class:`mojo_opset.contract.PermuteCall` and docs/ops.md."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    E = check_int("num_experts", num_experts, lo=1)
    validate_topk_ids(topk_ids, x.shape[0], E, x.device)
    return permute(PermuteCall(x=x, topk_ids=topk_ids, num_experts=E, align=validate_align(align)), backend)
