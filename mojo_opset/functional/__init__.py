"""The public, validated, dispatched functions (SPEC §3.8).

Each validates its arguments (errors name the argument), builds the op's typed call object
(:mod:`mojo_opset.contract`) and hands it to the dispatcher, which runs the selected backend's
implementation or the reference (:mod:`mojo_opset.reference`).  The MoE forward reads top-down in
:mod:`.forward`: gating -> permute -> experts -> combine (+ shared experts)."""
from .combine import moe_combine
from .experts import moe_experts, moe_quant_experts
from .forward import moe_forward
from .gating import moe_gating
from .permute import moe_permute
from .quant_forward import quant_moe_forward

__all__ = ["moe_gating", "moe_permute", "moe_experts", "moe_quant_experts", "moe_combine", "moe_forward",
           "quant_moe_forward"]
