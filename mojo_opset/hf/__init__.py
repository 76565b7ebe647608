"""Build :class:`mojo_opset.MoE` blocks from Hugging Face configs and load their checkpoint tensors."""
from .checkpoint import load_hf_state_dict
from .families import FAMILIES, build_moe, family_of, is_moe_layer, moe_config_from_hf

__all__ = ["FAMILIES", "build_moe", "family_of", "is_moe_layer", "moe_config_from_hf", "load_hf_state_dict"]
