"""Programmatic dependent launch (Hopper and newer) for the chain of kernels of one forward.

With it, a kernel of the chain (routing -> align -> up GEMM -> down GEMM -> combine) is launched while
its predecessor still runs: its programs are scheduled as soon as every program of the predecessor
has started, and each waits (``griddepcontrol.wait``) for the predecessor to finish before reading
anything: the launch and ramp-up of each kernel hide behind the tail of the one before.  Every
kernel of the chain waits first and only then lets its successor launch, so a kernel launched early
finds every kernel before its predecessor complete.  A decode step is a handful of kernels of
10-20 us each, so these gaps are a visible part of it.

``MOJO_PDL=0`` turns it off (the same kernels, launched one after the other).  Off under the Triton
interpreter and on GPUs before compute capability 9.0.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mojo_opset.environ import env_flag

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:         # a Triton without grid dependency control: never launched with PDL
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def chain_start(PDL: tl.constexpr):
    """First statement of a chained kernel: wait for the predecessor, then let the successor launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    return gdc_wait is not None and torch.version.hip is None and torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_on(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device are chained (see the module docstring)."""
    if t.device.type != "cuda" or not env_flag("MOJO_PDL", True):
        return False
    return _supported(t.device.index if t.device.index is not None else torch.cuda.current_device())


def launch_options(on: bool) -> dict:
    """The launch keywords of a chained kernel: ``PDL`` (its constexpr) and Triton's ``launch_pdl``."""
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
