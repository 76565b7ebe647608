"""Quantized MoE (SPEC §3.6): weight formats, ``quantize_experts``, ``QuantizedExperts`` and the
``quant_moe_forward`` op with its torch reference.  Formats and numerics: docs/quantization.md."""
from __future__ import annotations

from .forward import quant_moe_forward
from .int4 import pack_int4, unpack_int4
from .qexperts import QuantizedExperts, quantize_experts
from .reference import quant_experts_reference
from .schemes import QUANT_SCHEMES

__all__ = ["QUANT_SCHEMES", "QuantizedExperts", "quantize_experts", "quant_moe_forward", "quant_experts_reference",
           "pack_int4", "unpack_int4"]
