"""Build :class:`mojo_opset.MoE` blocks from Hugging Face configs and load their checkpoint tensors."""
from .build import build_moe, moe_config_from_hf
from .checkpoint import load_hf_state_dict
from .families import FAMILIES, family_of, is_moe_layer, moe_block_spec
from .fp8_experts import load_fp8_experts

__all__ = ["FAMILIES", "build_moe", "family_of", "is_moe_layer", "moe_block_spec", "moe_config_from_hf",
           "load_hf_state_dict", "load_fp8_experts"]
