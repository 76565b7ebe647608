"""Quantized MoE (SPEC §3.6): weight formats, ``quantize_experts``, ``QuantizedExperts`` and the
reference math of quantized experts.  The dispatched ``quant_moe_forward`` and ``moe_quant_experts``
live in :mod:`mojo_opset.functional`.  Formats and numerics: docs/quantization.md."""
from __future__ import annotations

from .int4 import pack_int4, unpack_int4
from .qexperts import QuantizedExperts, quantize_experts
from .reference import quant_experts_reference, quant_experts_rows
from .schemes import QUANT_SCHEMES

__all__ = ["QUANT_SCHEMES", "QuantizedExperts", "quantize_experts", "quant_experts_reference", "quant_experts_rows",
           "pack_int4", "unpack_int4"]
