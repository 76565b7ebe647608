"""The ttx op overrides: per-call capability answers and the calls into the ``mojo_ttx`` ops.

Each implementation reduces a call to a small hashable *feature* tuple; ``reasons`` is a pure
function of it, so the dispatcher may cache decisions by that tuple (``cache_key``).  Nothing here
synchronises with the device.
"""
from __future__ import annotations

import torch

from mojo_opset.backend import OpImpl
from mojo_opset.ops.names import MOE_COMBINE, MOE_EXPERTS, MOE_GATING, MOE_PERMUTE

from . import gating_kernel, library, permute_kernel
from .platform import interpreter_on

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
INT32_MAX = 2**31 - 1

# Whether the kernels were built for the interpreter: fixed when this module (and triton.jit) loads.
INTERPRETED = interpreter_on()


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _device_reason(name: str, device_type: str) -> str | None:
    if INTERPRETED:
        if device_type == "cpu":
            return None
        return (f"{name} is on {device_type} but the ttx kernels were loaded under the Triton interpreter "
                "(TRITON_INTERPRET=1), which runs them on CPU tensors only")
    if device_type in ("cuda", "npu"):
        return None
    if device_type == "cpu":
        return (f"{name} is a CPU tensor: the ttx kernels run on CPU tensors only under the Triton "
                "interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    return f"{name} is on {device_type}; the ttx kernels serve npu and cuda tensors (cpu under the interpreter)"


def _tensor_reasons(features: dict, dtypes: dict) -> list[str]:
    """Device and dtype reasons for ``features = {name: (device_type, dtype)}``."""
    out = []
    for name, (dev, dt) in features.items():
        r = _device_reason(name, dev)
        if r:
            out.append(r)
        allowed = dtypes.get(name)
        if allowed is not None and dt not in allowed:
            out.append(f"{name} has dtype {_dtype_name(dt)}; the ttx kernel takes "
                       f"{', '.join(_dtype_name(d) for d in allowed)}")
    return out


class _Impl(OpImpl):
    supports_autograd = False  # no backward: calls needing grad go to the reference

    def features(self, **call) -> tuple:
        raise NotImplementedError

    def reasons_for(self, features: tuple) -> list[str]:
        raise NotImplementedError

    def cache_key(self, **call):
        return self.features(**call)

    def reasons(self, **call) -> list[str]:
        return self.reasons_for(self.features(**call))


class Gating(_Impl):
    op = MOE_GATING

    def features(self, logits, top_k, score_func, route_norm, route_scale, expert_bias, num_expert_groups,
                 num_limited_groups, group_score, forced_expert_ids):
        bias = None if expert_bias is None else (expert_bias.device.type, expert_bias.dtype)
        return (logits.device.type, logits.dtype, logits.shape[1], score_func, group_score, bias,
                forced_expert_ids is not None)

    def reasons_for(self, f):
        dev, dt, E, score_func, group_score, bias, forced = f
        out = []
        if forced:
            out.append("forced_expert_ids (router replay) is not implemented by the ttx routing kernel")
        tensors = {"logits": (dev, dt)}
        if bias is not None:
            tensors["expert_bias"] = bias
        out += _tensor_reasons(tensors, {"logits": FLOATS, "expert_bias": FLOATS})
        if score_func not in ("softmax", "sigmoid"):
            out.append(f"score_func {score_func!r} is not implemented by the ttx routing kernel")
        if group_score not in ("top2_sum", "max"):
            out.append(f"group_score {group_score!r} is not implemented by the ttx routing kernel")
        if E > gating_kernel.MAX_EXPERTS:
            out.append(f"E = {E} experts exceeds the ttx routing kernel's limit of {gating_kernel.MAX_EXPERTS} "
                       "(a row tile must fit the on-chip buffer)")
        return out

    def forward(self, logits, top_k, score_func, route_norm, route_scale, expert_bias, num_expert_groups,
                num_limited_groups, group_score, forced_expert_ids):
        return library.gating(logits, top_k, score_func, route_norm, route_scale, expert_bias,
                              num_expert_groups, num_limited_groups, group_score)


class Permute(_Impl):
    op = MOE_PERMUTE

    def features(self, x, topk_ids, num_experts, align):
        E, align = int(num_experts), int(align)
        # a flag, not the pair count, so that the dispatcher's decision cache does not grow with T
        too_many = topk_ids.numel() >= 2**24 or topk_ids.numel() + E * max(align - 1, 0) > INT32_MAX
        return (x.device.type, x.dtype, topk_ids.device.type, topk_ids.dtype, topk_ids.dim(), too_many, E, align)

    def reasons_for(self, f):
        dev, dt, idev, idt, idim, too_many, E, align = f
        out = _tensor_reasons({"x": (dev, dt), "topk_ids": (idev, idt)}, {"x": FLOATS, "topk_ids": INDEX_DTYPES})
        if idim != 2:
            out.append(f"topk_ids must be [T, K]; got {idim} dimensions")
        if E > permute_kernel.MAX_EXPERTS:
            out.append(f"E = {E} experts exceeds the ttx permute kernel's limit of {permute_kernel.MAX_EXPERTS}")
        if align < 1:
            out.append(f"align must be >= 1, got {align}")
        elif too_many:
            # pair ids are compared as fp32 (exact below 2**24) and stored as int32
            out.append("T*K reaches 2**24 pairs, beyond the ttx permute kernel's index range")
        return out

    def forward(self, x, topk_ids, num_experts, align):
        return library.permute(x, topk_ids, int(num_experts), int(align))


class Experts(_Impl):
    op = MOE_EXPERTS
    required_alignment = 1  # row tiles are masked at group bounds: any group start works

    def features(self, permuted_x, group_ends, w13, w2, activation):
        return (permuted_x.device.type, permuted_x.dtype, w13.device.type, w13.dtype, w2.device.type, w2.dtype,
                w13.is_contiguous(), w2.is_contiguous(), w13.shape[1] * w13.shape[2] > INT32_MAX, activation)

    def reasons_for(self, f):
        dev, dt, dev13, dt13, dev2, dt2, c13, c2, huge_expert, activation = f
        out = []
        if activation != "swiglu":
            out.append(f"activation {activation!r} is not implemented by the ttx experts kernel (swiglu only)")
        out += _tensor_reasons({"permuted_x": (dev, dt), "w13": (dev13, dt13), "w2": (dev2, dt2)},
                               {"permuted_x": FLOATS, "w13": FLOATS, "w2": FLOATS})
        for name, ok in (("w13", c13), ("w2", c2)):
            if not ok:
                out.append(f"{name} is not contiguous: the ttx experts kernel reads contiguous weight rows "
                           "and will not copy the expert weights on every call")
        if huge_expert:
            out.append("one expert's w13 has more than 2**31 elements, beyond the ttx experts kernel's "
                       "int32 expert stride")
        return out

    def forward(self, permuted_x, group_ends, w13, w2, activation):
        return library.experts(permuted_x, group_ends, w13, w2)


class Combine(_Impl):
    op = MOE_COMBINE

    def features(self, expert_out, pair_row, topk_weights, num_tokens):
        return (expert_out.device.type, expert_out.dtype, pair_row.device.type, pair_row.dtype,
                topk_weights.device.type, topk_weights.dtype)

    def reasons_for(self, f):
        dev, dt, pdev, pdt, wdev, wdt = f
        return _tensor_reasons({"expert_out": (dev, dt), "pair_row": (pdev, pdt), "topk_weights": (wdev, wdt)},
                               {"expert_out": FLOATS, "pair_row": INDEX_DTYPES, "topk_weights": FLOATS})

    def forward(self, expert_out, pair_row, topk_weights, num_tokens):
        return library.combine(expert_out, pair_row, topk_weights, int(num_tokens))


def make_impls() -> dict[str, OpImpl]:
    return {impl.op: impl for impl in (Gating(), Permute(), Experts(), Combine())}
