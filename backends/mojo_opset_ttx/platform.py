"""Where the ttx kernels can run, and how many programs a launch may use.

triton-ascend maps programs to physical cores: a launch uses a 1-D grid no larger than the core
count and each program loops over its share of the work.  The same rule is followed on every
Triton target so the kernels exercised under the interpreter and on a GPU are the ones an NPU runs.
This module imports nothing heavy at import time.
"""
from __future__ import annotations

import functools
import os

import torch

# Programs per launch when the core count cannot be asked (the interpreter, or no driver answer).
INTERPRETER_PROGRAMS = 4
FALLBACK_PROGRAMS = 32
MAX_GRID = 65535  # triton-ascend's hard cap on a grid dimension


def interpreter_on() -> bool:
    """True when Triton kernels run interpreted on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401
    except Exception:  # ImportError without CANN; RuntimeError/OSError on a broken install
        return False
    try:
        return bool(torch.npu.is_available())
    except Exception:
        return False


def device_reason(t: torch.Tensor, name: str = "x") -> str | None:
    """None when the kernels can run on ``t``'s device, else why not."""
    kind = t.device.type
    if interpreter_on():
        if kind == "cpu":
            return None
        return (f"{name} is on {kind} but the Triton interpreter is on (TRITON_INTERPRET=1): the ttx "
                "kernels then run on CPU tensors only")
    if kind in ("cuda", "npu"):
        return None
    if kind == "cpu":
        return (f"{name} is a CPU tensor: the ttx kernels run on CPU tensors only under the Triton "
                "interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    return f"{name} is on {kind}; the ttx kernels run on npu, cuda, or cpu under the Triton interpreter"


@functools.lru_cache(maxsize=None)
def _core_count(device_type: str, index: int, cube: bool) -> int:
    try:
        import triton

        props = triton.runtime.driver.active.utils.get_device_properties(index)
    except Exception:
        return FALLBACK_PROGRAMS
    if device_type == "npu":
        key = "num_aicore" if cube else "num_vectorcore"
        n = props.get(key) or props.get("num_aicore")
    else:
        n = props.get("multiprocessor_count")
    return int(n) if n else FALLBACK_PROGRAMS


def num_programs(device: torch.device, work_items: int, cube: bool = False) -> int:
    """Grid size for ``work_items`` items: at most one program per core (vector cores, or AI cores
    for kernels using ``tl.dot`` when ``cube``), at least one."""
    if interpreter_on() or device.type == "cpu":
        cores = INTERPRETER_PROGRAMS
    else:
        index = device.index if device.index is not None else 0
        cores = _core_count(device.type, index, cube)
    return max(1, min(cores, int(work_items), MAX_GRID))


def needs_int64(*numels: int) -> bool:
    """True when an element offset may reach 2**31 (then kernels index in int64)."""
    return any(n >= 2**31 - 1 for n in numels)
