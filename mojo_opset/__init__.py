"""mojo_opset: Mixture-of-Experts operators for PyTorch with interchangeable hardware backends.

The torch reference in :mod:`mojo_opset.ops` defines what is correct; backends found through the
``mojo_opset.backends`` entry-point group override the ops they accelerate and decline, with
reasons, the calls they cannot serve.
"""
from __future__ import annotations

from ._version import __version__
from .backend import Backend, OpImpl, op_impl
from .dispatch import (BackendError, StrictFallbackError, explain, fallback_counts, is_strict, last_served,
                       reset_stats, select_backend, strict, use_backend)
from .ops.gating import moe_gating
from .ops.forward import moe_forward
from .ops.names import OPS
from .quant import QUANT_SCHEMES, QuantizedExperts, quant_moe_forward, quantize_experts
from .registry import available_backends, refresh as refresh_backends, register_backend, unregister_backend
from . import losses
from .modules import GroupedExperts, MoE, Router, SharedExperts
from .replay import RouterReplay
from . import hf

__all__ = [
    "__version__", "Backend", "OpImpl", "op_impl", "BackendError", "StrictFallbackError", "explain",
    "fallback_counts", "is_strict", "last_served", "reset_stats", "select_backend", "strict", "use_backend",
    "moe_gating", "moe_forward", "OPS", "available_backends", "refresh_backends", "register_backend",
    "unregister_backend", "QUANT_SCHEMES", "QuantizedExperts", "quant_moe_forward", "quantize_experts",
    "losses", "hf", "MoE", "Router", "GroupedExperts", "SharedExperts", "RouterReplay",
]
