"""mojo_opset: Mixture-of-Experts operators for PyTorch with interchangeable hardware backends.

Layers (docs/architecture.md): :mod:`mojo_opset.contract` (op names and typed call objects),
:mod:`mojo_opset.reference` (the torch math: the definition of correct), :mod:`mojo_opset.dispatch`
and :mod:`mojo_opset.registry` (backend selection, capabilities, fallback), :mod:`mojo_opset.functional`
(the public, validated, dispatched functions), then modules, replay, quantization, tools.
"""
from __future__ import annotations

from ._version import __version__
from .backend import API_VERSION, Backend, OpImpl, op_impl
from .contract import OPS
from .dispatch import (BackendError, StrictFallbackError, explain, fallback_counts, is_strict, last_served,
                       reset_stats, select_backend, strict, use_backend)
from .modes import deterministic, is_deterministic
from .functional import (moe_combine, moe_experts, moe_forward, moe_gating, moe_permute, moe_quant_experts,
                         quant_moe_forward)
from .quant import QUANT_SCHEMES, QuantizedExperts, quantize_experts
from .registry import available_backends, refresh as refresh_backends, register_backend, unregister_backend
from . import losses
from .modules import GroupedExperts, MoE, Router, SharedExperts
from .replay import RouterReplay
from . import hf
from .compat import (MojoExperts, MojoMoE, MojoMoECombine, MojoMoEDispatch, MojoMoEGating, MojoQuantExperts,
                     MojoQuantMoE)

__all__ = [
    "__version__", "API_VERSION", "Backend", "OpImpl", "op_impl", "BackendError", "StrictFallbackError", "explain",
    "fallback_counts", "is_strict", "last_served", "reset_stats", "select_backend", "strict", "use_backend",
    "deterministic", "is_deterministic",
    "moe_gating", "moe_permute", "moe_experts", "moe_quant_experts", "moe_combine", "moe_forward",
    "quant_moe_forward", "OPS", "available_backends", "refresh_backends", "register_backend",
    "unregister_backend", "QUANT_SCHEMES", "QuantizedExperts", "quantize_experts",
    "losses", "hf", "MoE", "Router", "GroupedExperts", "SharedExperts", "RouterReplay",
    "MojoMoE", "MojoQuantMoE", "MojoMoEGating", "MojoMoEDispatch", "MojoExperts", "MojoQuantExperts", "MojoMoECombine",
]
