"""mojo_opset backend ``ttx``: Triton kernels written under triton-ascend's constraints.

They target Ascend NPUs (the default for npu tensors after the ``npu`` backend) and run unchanged
on any Triton target and under the Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``).
Triton is imported only when the backend is probed or loaded.  See docs/backends/ttx.md.

Layout (the same in every backend): ``platform`` (availability, device reasons, versions),
``custom_ops`` (the ``mojo_ttx`` torch.library ops), one module per op (``gating``, ``permute``,
``experts``, ``combine``: declarations, reasons, the call into its custom op) and the Triton kernels
with their launchers in ``*_kernel``.
"""
from __future__ import annotations

from mojo_opset.backend import Backend

__all__ = ["TtxBackend"]


class TtxBackend(Backend):
    name = "ttx"
    description = ("Triton kernels for routing, permute, grouped SwiGLU experts and combine, written under "
                   "triton-ascend's constraints (Ascend NPU; also any Triton target and the interpreter)")
    device_types = ("npu", "cuda", "cpu")
    default_for = ("npu",)
    default_priority = 20  # after the npu backend's fused operators

    def unavailable_reason(self) -> str | None:
        from .platform import unavailable_reason

        return unavailable_reason()

    def load(self):
        from . import custom_ops  # noqa: F401  (registers the mojo_ttx ops the impls call)
        from .combine import Combine
        from .experts import Experts
        from .gating import Gating
        from .permute import Permute

        return {impl.op: impl for impl in (Gating(), Permute(), Experts(), Combine())}

    def versions(self) -> dict[str, str]:
        from .platform import versions

        return versions()
