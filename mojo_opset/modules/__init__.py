"""nn.Module forms of the MoE ops, in the declarative pattern: a nested ``Config`` per module whose
``build()`` fills in the sizes the parent knows, and ``init_weights(seed)`` for deterministic init."""
from .experts import GroupedExperts, SharedExperts
from .moe import MoE
from .router import Router

__all__ = ["MoE", "Router", "GroupedExperts", "SharedExperts"]
