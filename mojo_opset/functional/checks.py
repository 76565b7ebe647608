"""Argument checks of the experts, shared experts and sub-op entry points (SPEC §6): every error
names the argument and the expectation; shapes are printed as ``[a, b, c]``."""
from __future__ import annotations

import torch

from ..quant.qexperts import QuantizedExperts
from ..reference.swiglu import ACTIVATIONS
from ..validation import ALIGNMENTS, FLOAT_DTYPES, check_choice, check_index_range, check_int, check_tensor, fail

INDEX_DTYPES = (torch.int32, torch.int64)


def validate_experts(x2, w13, w2, num_experts_local, activation, name13="w13", name2="w2"):
    H = x2.shape[1]
    check_choice("activation", activation, ACTIVATIONS)
    check_tensor(name13, w13, ndim=3, dtypes=FLOAT_DTYPES, device=x2.device)
    check_tensor(name2, w2, ndim=3, dtypes=FLOAT_DTYPES, device=x2.device)
    E, N, Hw = w13.shape
    if num_experts_local is not None and E != num_experts_local:
        fail(f"{name13} must have {num_experts_local} experts (dim 0), got shape {list(w13.shape)}")
    if Hw != H:
        fail(f"{name13} must have shape [E, 2*I, H] with H = {H} (x.shape[-1]), got {list(w13.shape)}")
    if N % 2:
        fail(f"{name13} must have shape [E, 2*I, H] (gate rows then up rows: an even count), got {list(w13.shape)}")
    if tuple(w2.shape[:2]) != (E, H):
        fail(f"{name2} must have shape [E, H, I] = {[E, H, N // 2]}, got {list(w2.shape)}")
    if w2.shape[2] != N // 2:
        # either may be wrong (e.g. a w13 of [E, I, H] without its up half): name both
        I2 = w2.shape[2]
        fail(f"{name13} and {name2} disagree on the intermediate size I: {name13} {list(w13.shape)} gives I = "
             f"{N // 2}, so {name2} must have shape [E, H, I] = {[E, H, N // 2]}; {name2} {list(w2.shape)} gives "
             f"I = {I2}, so {name13} must have shape [E, 2*I, H] = {[E, 2 * I2, H]}")


def validate_qexperts(x2: torch.Tensor, q, num_experts_local: int, activation: str) -> None:
    check_choice("activation", activation, ACTIVATIONS)
    if not isinstance(q, QuantizedExperts):
        fail(f"q must be a mojo_opset.QuantizedExperts (from quantize_experts or "
             f"QuantizedExperts.from_tensors), got {type(q).__name__}", TypeError)
    if q.device != x2.device:
        fail(f"q is on {q.device} but x is on {x2.device}: move it with q.to(x.device)")
    if num_experts_local is not None and q.num_experts != num_experts_local:
        fail(f"q must hold {num_experts_local} experts (the experts of gate_weight, or this rank's slice "
             f"with ep_group), got {q.num_experts}")
    if q.hidden_size != x2.shape[1]:
        fail(f"q's hidden size must equal x.shape[-1] = {x2.shape[1]}, got {q.hidden_size} "
             f"(w13 {list(q.w13_shape)}, w2 {list(q.w2_shape)})")


def validate_shared(x2, shared_w13, shared_w2, shared_gate):
    if (shared_w13 is None) != (shared_w2 is None):
        fail("shared_w13 and shared_w2 must be given together")
    if shared_gate is not None and shared_w13 is None:
        fail("shared_gate needs shared_w13 and shared_w2")
    if shared_w13 is None:
        return
    H = x2.shape[1]
    check_tensor("shared_w13", shared_w13, ndim=2, dtypes=FLOAT_DTYPES, device=x2.device)
    n = shared_w13.shape[0]
    if n % 2 or shared_w13.shape[1] != H:
        fail(f"shared_w13 must have shape [2*I_s, H] with H = {H}, got {list(shared_w13.shape)}")
    check_tensor("shared_w2", shared_w2, dtypes=FLOAT_DTYPES, device=x2.device, shape=(H, n // 2))
    if shared_gate is not None:
        check_tensor("shared_gate", shared_gate, dtypes=FLOAT_DTYPES, device=x2.device, shape=(1, H))


def validate_topk_ids(topk_ids, T: int, num_experts: int, device, name="topk_ids") -> None:
    """Integer ``[T, K]`` ids on x's device with values in [0, E) (an id outside would otherwise be
    silently dropped): checked on the host for CPU tensors, by a device-side assert elsewhere (no
    host synchronisation, so the call still captures in a CUDA graph)."""
    check_tensor(name, topk_ids, ndim=2, dtypes=INDEX_DTYPES, device=device)
    if topk_ids.shape[0] != T:
        fail(f"{name} must have shape [T, K] with T = {T}, got {list(topk_ids.shape)}")
    check_index_range(name, topk_ids, num_experts)


def validate_align(align) -> int:
    align = check_int("align", align)
    check_choice("align", align, ALIGNMENTS)
    return align


def validate_group_ends(group_ends, num_experts: int, rows: int, device) -> None:
    check_tensor("group_ends", group_ends, ndim=1, dtypes=INDEX_DTYPES, device=device, shape=(num_experts,))
