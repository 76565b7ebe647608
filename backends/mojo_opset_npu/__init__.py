"""mojo_opset's ``npu`` backend: MoE operators on torch_npu's fused operators.

Registered through the ``mojo_opset.backends`` entry point ``npu``.  Importing this package does
not import torch_npu; the backend imports it when asked whether it is available.
"""
from .backend import NpuBackend

__all__ = ["NpuBackend"]
