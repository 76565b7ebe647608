"""Where the ttx kernels can run (availability, device reasons, versions) and how many programs a
launch may use.

triton-ascend maps programs to physical cores: a launch uses a 1-D grid no larger than the core
count and each program loops over its share of the work.  The same rule is followed on every
Triton target so the kernels exercised under the interpreter and on a GPU are the ones an NPU runs.
This module imports nothing heavy at import time.
"""
from __future__ import annotations

import functools
import os

import torch

from mojo_opset.backend import OpImpl

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

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


@functools.lru_cache(maxsize=None)
def kernels_interpreted() -> bool:
    """Whether the loaded kernels run under the interpreter.  ``triton.jit`` reads TRITON_INTERPRET
    when a kernel module is imported, so the answer is read once (custom_ops asks right after
    importing the kernels) and a later change of the variable cannot make the decisions lie."""
    return interpreter_on()


def device_reason(name: str, device_type: str) -> str | None:
    """None when the loaded kernels run on ``device_type`` tensors, else why not.  Devices outside
    the backend's declared ``device_types`` are declined by the core before this is asked."""
    if kernels_interpreted():
        if device_type not in ("cuda", "npu"):
            return None
        return (f"{name} is on {device_type} but the ttx kernels were loaded under the Triton interpreter "
                "(TRITON_INTERPRET=1), which runs them on CPU tensors only")
    if device_type == "cpu":
        return (f"{name} is a CPU tensor: the ttx kernels run on CPU tensors only under the Triton "
                "interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    return None


def index_dtype_reason(name: str, dtype: torch.dtype) -> str | None:
    """None for int32/int64 index tensors (the kernels read either), else why not."""
    if dtype in INDEX_DTYPES:
        return None
    names = ", ".join(_dtype_name(d) for d in INDEX_DTYPES)
    return f"{name} has dtype {_dtype_name(dtype)}; the ttx kernel takes {names}"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


class TtxOpImpl(OpImpl):
    """What every ttx op shares: fp32/fp16/bf16 data, no backward, and the device reason, which
    depends on whether the kernels were built for the interpreter (hence ``state_key``)."""

    dtypes = FLOATS
    supports_autograd = False  # calls needing grad go to the reference

    def state_key(self):
        return kernels_interpreted()

    def extra_reasons(self, call) -> list[str]:
        r = device_reason(call.data, call.device.type)
        return [r] if r else []


def unavailable_reason() -> str | None:
    """None when the kernels can run here (an NPU, a CUDA GPU or the interpreter), else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if interpreter_on() or npu_available():
        return None
    try:
        if torch.cuda.is_available():
            return None
    except Exception:
        pass
    return ("no Ascend NPU or CUDA GPU, and the Triton interpreter is off (set TRITON_INTERPRET=1 "
            "before triton is imported to run the kernels on CPU tensors)")


def versions() -> dict[str, str]:
    try:
        import triton

        return {"triton": triton.__version__}
    except Exception:
        return {}


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
