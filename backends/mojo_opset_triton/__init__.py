"""``triton``: Triton kernels for NVIDIA GPUs (fused routing, align, grouped-GEMM SwiGLU experts).

Available when triton imports and either a CUDA device is present or the Triton interpreter is on
(``TRITON_INTERPRET=1`` set before triton is imported), in which case it serves CPU tensors for
tests and ``mojo-opset compare``; it is the default backend for CUDA tensors only.
"""
from __future__ import annotations

from mojo_opset.backend import Backend

__all__ = ["TritonBackend"]


class TritonBackend(Backend):
    name = "triton"
    description = "Triton kernels for NVIDIA GPUs: fused routing, align/permute, fused grouped-GEMM experts"
    device_types = ("cuda", "cpu")
    default_for = ("cuda",)
    default_priority = 10

    def unavailable_reason(self):
        from .platform import unavailable_reason

        return unavailable_reason()

    def load(self):
        from . import custom_ops  # noqa: F401  (registers the torch.library ops)
        from .combine import CombineImpl
        from .forward import ForwardImpl
        from .gating import GatingImpl
        from .permute import PermuteImpl
        from .quant_forward import quant_impls

        impls = {impl.op: impl for impl in (GatingImpl(), PermuteImpl(), CombineImpl(), ForwardImpl())}
        impls.update(quant_impls())        # quant_moe_forward (fused) and moe_quant_experts
        return impls

    def versions(self):
        out = {}
        try:
            import triton

            out["triton"] = triton.__version__
        except Exception as exc:  # versions are informative only
            out["triton"] = f"not importable ({type(exc).__name__})"
        from .platform import interpreter_on

        out["interpreter"] = "on" if interpreter_on() else "off"
        return out
