"""mojo_opset's ``npu`` backend: MoE operators on torch_npu's fused operators (Ascend NPUs).

Registered through the ``mojo_opset.backends`` entry point ``npu``.  Importing this package does
not import torch_npu; the backend imports it when asked whether it is available.

Layout (the same in every backend): ``platform`` (finding torch_npu, versions, shared checks),
``custom_ops`` (the ``mojo_npu`` torch.library ops), one module per op (``gating``, ``permute``,
``experts``, ``combine``, ``forward``, ``quant_forward``: the launcher on torch_npu's operators,
the declarations and reasons, the OpImpl calling its custom op).
"""
from __future__ import annotations

from mojo_opset.backend import Backend

from .platform import import_torch_npu, is_emulation, versions

__all__ = ["NpuBackend"]


class NpuBackend(Backend):
    name = "npu"
    description = "torch_npu fused MoE operators (gating top-k, init_routing_v2, grouped_matmul, unpermute)"
    device_types = ("npu",)
    default_for = ("npu",)
    default_priority = 10

    def __init__(self):
        self._torch_npu = None

    def unavailable_reason(self):
        mod, reason = import_torch_npu()
        self._torch_npu = mod
        if mod is not None and is_emulation(mod):
            # the tests' pure-PyTorch stand-in runs on CPU tensors; a real torch_npu never sets the flag
            self.device_types = ("npu", "cpu")
        return reason

    def load(self):
        from . import custom_ops  # noqa: F401  (registers the mojo_npu ops the impls call)
        from .combine import NpuCombine
        from .experts import NpuExperts
        from .forward import NpuMoeForward
        from .gating import NpuGating
        from .permute import NpuPermute
        from .quant_forward import NpuQuantMoeForward

        impls = (NpuGating(), NpuPermute(), NpuExperts(), NpuCombine(), NpuMoeForward(), NpuQuantMoeForward())
        return {impl.op: impl for impl in impls}

    def versions(self):
        return versions(self._torch_npu)
