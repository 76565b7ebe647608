"""Argument checks shared by the public entry points: every error names the argument and the expectation."""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALIGNMENTS = (1, 8, 16, 32, 64, 128)


def fail(msg: str, exc=ValueError):
    raise exc(msg)


def check_tensor(name: str, t, *, ndim: int | Iterable[int] | None = None,
                 dtypes: Iterable[torch.dtype] | None = None, device: torch.device | None = None,
                 shape: tuple | None = None) -> torch.Tensor:
    """Validate one tensor argument. ``shape`` entries of None match anything."""
    if not isinstance(t, torch.Tensor):
        fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            fail(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            fail(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}", TypeError)
    if device is not None and t.device != device:
        fail(f"{name} is on {t.device} but x is on {device}: all tensors must be on one device")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            fail(f"{name} must have shape {want}, got {list(t.shape)}")
    return t


def check_int(name: str, v, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, (bool, torch.Tensor)) or not hasattr(v, "__index__"):
            fail(f"{name} must be an int, got {type(v).__name__}", TypeError)
        v = int(v)
    if lo is not None and v < lo:
        fail(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        fail(f"{name} must be <= {hi}, got {v}")
    return v


def check_choice(name: str, v, choices: Iterable) -> None:
    choices = tuple(choices)
    if v not in choices:
        fail(f"{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")


def check_index_range(name: str, t: torch.Tensor, hi: int) -> None:
    """Integer values of ``t`` in ``[0, hi)``: checked on the host for CPU tensors, by a device-side
    assert elsewhere (no host synchronisation); a meta tensor holds no values to check."""
    if not t.numel() or t.device.type == "meta":
        return
    bad = ((t < 0) | (t >= hi)).any()
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad):
            lo, top = torch.aminmax(t)
            fail(f"{name} must lie in [0, {hi}), got values from {int(lo)} to {int(top)}")
    else:
        torch._assert_async(~bad, f"{name} must lie in [0, {hi})")
