"""The op contract between the core and the backends: op names, typed call objects, output shapes.

Nothing here computes anything; it is what a backend (in-tree or a vendor's) programs against."""
from .calls import (CALL_TYPES, Call, CombineCall, ExpertsCall, ForwardCall, GatingCall, PermuteCall, QuantExpertsCall,
                    QuantForwardCall, RoutingOptions, option)
from .names import (MOE_COMBINE, MOE_EXPERTS, MOE_FORWARD, MOE_GATING, MOE_PERMUTE, MOE_QUANT_EXPERTS, OPS,
                    QUANT_MOE_FORWARD, env_name)

__all__ = ["CALL_TYPES", "Call", "CombineCall", "ExpertsCall", "ForwardCall", "GatingCall", "PermuteCall",
           "QuantExpertsCall", "QuantForwardCall", "RoutingOptions", "option", "MOE_COMBINE", "MOE_EXPERTS",
           "MOE_FORWARD", "MOE_GATING", "MOE_PERMUTE", "MOE_QUANT_EXPERTS", "OPS", "QUANT_MOE_FORWARD", "env_name"]
