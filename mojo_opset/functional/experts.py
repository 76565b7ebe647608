"""``moe_experts`` and ``moe_quant_experts`` (SPEC §3.3, §3.6): SwiGLU experts over expert-sorted rows."""
from __future__ import annotations

from ..contract.calls import ExpertsCall, QuantExpertsCall
from ..contract.names import MOE_EXPERTS
from ..dispatch import dispatch, implementation, select_backend
from ..modes import is_deterministic
from ..quant.reference import quant_experts_rows
from ..reference.experts import experts_reference
from ..validation import FLOAT_DTYPES, check_tensor
from .checks import validate_experts, validate_group_ends, validate_qexperts


def experts_reference_call(call: ExpertsCall):
    return experts_reference(call.permuted_x, call.group_ends, call.w13, call.w2, call.activation,
                             call.deterministic)


def quant_experts_reference_call(call: QuantExpertsCall):
    return quant_experts_rows(call.permuted_x, call.group_ends, call.qexperts, call.activation, call.deterministic)


def experts_alignment(device_type: str, op: str = MOE_EXPERTS, backend=None) -> int:
    """The row alignment the selected experts implementation needs from permute (1 for the reference).

    Read from the implementation's declaration, not from its per-call answer: padded groups are valid
    input for every implementation, so if it declines the call the reference serves the same rows."""
    impl = implementation(select_backend(op, device_type, backend), op)
    return int(impl.required_alignment or 1) if impl is not None else 1


def experts(call: ExpertsCall, backend=None):
    return dispatch(call, experts_reference_call, backend=backend)[0]


def quant_experts(call: QuantExpertsCall, backend=None):
    return dispatch(call, quant_experts_reference_call, backend=backend)[0]


def moe_experts(permuted_x, group_ends, w13, w2, *, activation="swiglu", backend=None):
    """SwiGLU experts on expert-sorted rows (as :func:`moe_permute` returns them): for expert e's rows
    X_e, ``(silu(X_e W1_e^T) * (X_e W3_e^T)) W2_e^T`` with ``[W1_e; W3_e] = w13[e]``, ``W2_e = w2[e]``.
    Returns ``[R, H]`` in permuted_x's dtype; rows past ``group_ends[-1]`` are zero."""
    check_tensor("permuted_x", permuted_x, ndim=2, dtypes=FLOAT_DTYPES)
    validate_experts(permuted_x, w13, w2, None, activation)
    validate_group_ends(group_ends, w13.shape[0], permuted_x.shape[0], permuted_x.device)
    return experts(ExpertsCall(permuted_x=permuted_x, group_ends=group_ends, w13=w13, w2=w2, activation=activation,
                               deterministic=is_deterministic()), backend)


def moe_quant_experts(permuted_x, group_ends, qexperts, *, activation="swiglu", backend=None):
    """:func:`moe_experts` with the experts given as a :class:`mojo_opset.QuantizedExperts`
    (numerics: docs/quantization.md)."""
    check_tensor("permuted_x", permuted_x, ndim=2, dtypes=FLOAT_DTYPES)
    validate_qexperts(permuted_x, qexperts, None, activation)
    validate_group_ends(group_ends, qexperts.num_experts, permuted_x.shape[0], permuted_x.device)
    return quant_experts(QuantExpertsCall(permuted_x=permuted_x, group_ends=group_ends, qexperts=qexperts,
                                          activation=activation, deterministic=is_deterministic()), backend)
