"""SwiGLU and its gradient, the one formulation shared by the core and the backends.

``h = [gate | up]`` along the last dim; ``a = silu(gate) * up``, computed in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("swiglu",)


def swiglu(h: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``silu(gate) * up`` of ``h = [gate | up]``, computed in fp32, returned in ``out_dtype``."""
    g, u = h.float().chunk(2, dim=-1)
    return (F.silu(g) * u).to(out_dtype)


def swiglu_backward(h: torch.Tensor, grad_a: torch.Tensor) -> torch.Tensor:
    """``d h = [d gate | d up]`` (fp32) of ``a = swiglu(h)`` for the upstream gradient ``grad_a``.

    silu'(g) = sig(g) * (1 + g * (1 - sig(g)))."""
    g, u = h.float().chunk(2, dim=-1)
    ga = grad_a.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    dg = ga * u * sig * (1 + g * (1 - sig))
    du = ga * silu
    return torch.cat([dg, du], dim=-1)
