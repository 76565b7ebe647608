"""mojo_opset backend ``ttx``: Triton kernels written under triton-ascend's constraints.

They target Ascend NPUs (the default for npu tensors after the ``npu`` backend) and run unchanged
on any Triton target and under the Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``).
Triton is imported only when the backend is probed or loaded.  See docs/backends/ttx.md.
"""
from __future__ import annotations

from mojo_opset.backend import Backend

from .platform import interpreter_on, npu_available

__all__ = ["TtxBackend"]


class TtxBackend(Backend):
    name = "ttx"
    description = ("Triton kernels for routing, permute, grouped SwiGLU experts and combine, written under "
                   "triton-ascend's constraints (Ascend NPU; also any Triton target and the interpreter)")
    device_types = ("npu", "cuda", "cpu")
    default_for = ("npu",)
    default_priority = 20  # after the npu backend's fused operators

    def unavailable_reason(self) -> str | None:
        try:
            import triton  # noqa: F401
        except Exception as exc:
            return f"triton is not importable ({type(exc).__name__}: {exc})"
        if interpreter_on():
            return None
        if npu_available():
            return None
        try:
            import torch

            if torch.cuda.is_available():
                return None
        except Exception:
            pass
        return ("no Ascend NPU or CUDA GPU, and the Triton interpreter is off (set TRITON_INTERPRET=1 "
                "before triton is imported to run the kernels on CPU tensors)")

    def load(self):
        from .impls import make_impls

        return make_impls()

    def versions(self) -> dict[str, str]:
        try:
            import triton

            return {"triton": triton.__version__}
        except Exception:
            return {}
