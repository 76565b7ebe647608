"""The ``npu`` backend: MoE ops on torch_npu's fused operators (Ascend NPUs)."""
from __future__ import annotations

from mojo_opset.backend import Backend

from .runtime import import_torch_npu, is_emulation


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
        # imported here: registering the custom ops is not needed until the backend is used
        from .combine import NpuCombine
        from .experts import NpuExperts
        from .forward import NpuMoeForward
        from .gating import NpuGating
        from .permute import NpuPermute
        from .quant import NpuQuantMoeForward

        impls = (NpuGating(), NpuPermute(), NpuExperts(), NpuCombine(), NpuMoeForward(), NpuQuantMoeForward())
        return {impl.op: impl for impl in impls}

    def versions(self):
        mod = self._torch_npu
        if mod is None:
            return {}
        out = {"torch_npu": str(getattr(mod, "__version__", "unknown"))}
        if is_emulation(mod):
            out["torch_npu"] += " (pure-PyTorch test emulation, not an NPU)"
        return out
