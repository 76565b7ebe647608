"""Elementwise and reduction steps of the reference, fused into one kernel on large CUDA inputs.

The reference's SwiGLU and combine run in fp32; in eager PyTorch each fp32 step is a pass over
memory with an fp32 temporary, several times the traffic of the grouped GEMMs' own epilogues.  On
CUDA, above ``MIN_ELEMENTS``, a step decorated with :func:`fused` runs the very same torch code
compiled by Inductor into one kernel (same math, no temporaries, deterministic).  Everywhere else
(CPU, NPU, small inputs, inside a ``torch.compile`` trace, or if compiling fails) it runs eagerly.
Compilation happens on first use per dtype; warm up before capturing a CUDA graph.
"""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("mojo_opset")

MIN_ELEMENTS = 1 << 22


def fused(fn):
    """``fn(t, ...)``: pure torch on tensors; fused when ``t`` is a large CUDA tensor."""
    state = {"compiled": None, "failed": False}

    @functools.wraps(fn)
    def wrapper(t, *args):
        if (t.device.type != "cuda" or t.numel() < MIN_ELEMENTS or state["failed"]
                or torch.compiler.is_compiling()):
            return fn(t, *args)
        if state["compiled"] is None:
            state["compiled"] = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return state["compiled"](t, *args)
        except Exception as exc:  # no working compiler here: the eager code computes the same values
            state["failed"] = True
            log.warning("mojo_opset: fusing %s failed (%s: %s); running it eagerly", fn.__name__,
                        type(exc).__name__, exc)
            return fn(t, *args)

    wrapper.eager = fn   # the deterministic mode's choice: compiled code may round differently (FMA)
    return wrapper
