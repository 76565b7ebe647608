"""Drop-in compatibility with the original mojo_opset's MoE operator classes (SPEC §8, docs/migrating.md).

``MojoMoE``, ``MojoQuantMoE``, ``MojoMoEGating``, ``MojoMoEDispatch``, ``MojoExperts``,
``MojoQuantExperts`` and ``MojoMoECombine`` keep the original's constructors, forward signatures,
parameter layouts (so its state dicts load unchanged), ``MOJO_BACKEND`` choice at construction,
``_registry`` lookups and ``forward_diff_with``.  Each is a thin layer over this library's functional
ops; none holds math of its own.
"""
from .backends import BackendRegistry, resolve_backend
from .diff import DiffStats, check_tol_diff
from .dispatch_combine import MojoMoECombine, MojoMoEDispatch
from .env import ENV_VARS, original_env_settings
from .experts import MojoExperts
from .gating import MojoMoEGating
from .moe import MojoMoE, MojoQuantMoE
from .operator import MojoOperator
from .quant import MojoQuantExperts, QuantLayout, convert_quant_experts, quant_layout

__all__ = ["MojoOperator", "MojoMoE", "MojoQuantMoE", "MojoMoEGating", "MojoMoEDispatch", "MojoExperts",
           "MojoQuantExperts", "MojoMoECombine", "convert_quant_experts", "quant_layout", "QuantLayout",
           "check_tol_diff", "DiffStats", "resolve_backend", "BackendRegistry", "ENV_VARS", "original_env_settings"]
