"""``moe_combine`` (SPEC §3.4): each token's weighted sum of its expert rows, fp32 accumulation."""
from __future__ import annotations

import torch

from ..contract.calls import CombineCall
from ..dispatch import dispatch
from ..modes import is_deterministic
from ..reference.combine import combine_reference
from ..validation import FLOAT_DTYPES, check_tensor, fail
from .checks import INDEX_DTYPES


def combine_reference_call(call: CombineCall):
    return combine_reference(call.expert_out, call.pair_row, call.topk_weights, call.num_tokens, call.deterministic)


def combine(call: CombineCall, backend=None):
    return dispatch(call, combine_reference_call, backend=backend)[0]


def moe_combine(expert_out, pair_row, topk_weights, *, backend=None):
    """``out[t] = sum_j topk_weights[t, j] * expert_out[pair_row[t*K + j]]`` (fp32 accumulation),
    ``[T, H]`` in expert_out's dtype; ``pair_row`` as returned by :func:`moe_permute`."""
    check_tensor("expert_out", expert_out, ndim=2, dtypes=FLOAT_DTYPES)
    dev = expert_out.device
    check_tensor("topk_weights", topk_weights, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    T, K = topk_weights.shape
    check_tensor("pair_row", pair_row, ndim=1, dtypes=INDEX_DTYPES, device=dev, shape=(T * K,))
    if pair_row.numel() and dev.type == "cpu" and not torch.compiler.is_compiling():
        if bool(((pair_row < 0) | (pair_row >= expert_out.shape[0])).any()):
            fail(f"pair_row must lie in [0, {expert_out.shape[0]}) (rows of expert_out)")
    return combine(CombineCall(expert_out=expert_out, pair_row=pair_row, topk_weights=topk_weights, num_tokens=T,
                               deterministic=is_deterministic()), backend)
