"""Op identifiers shared by the dispatcher, the backends and the tools (SPEC §3.8)."""
MOE_GATING = "moe_gating"
MOE_PERMUTE = "moe_permute"
MOE_EXPERTS = "moe_experts"
MOE_QUANT_EXPERTS = "moe_quant_experts"
MOE_COMBINE = "moe_combine"
MOE_FORWARD = "moe_forward"
QUANT_MOE_FORWARD = "quant_moe_forward"

OPS = (MOE_GATING, MOE_PERMUTE, MOE_EXPERTS, MOE_QUANT_EXPERTS, MOE_COMBINE, MOE_FORWARD, QUANT_MOE_FORWARD)


def env_name(op: str) -> str:
    """``moe_gating`` -> ``MOJO_BACKEND_MOE_GATING``."""
    return "MOJO_BACKEND_" + op.upper()
