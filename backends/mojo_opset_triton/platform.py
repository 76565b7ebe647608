"""Where the kernels can run: a CUDA device, or CPU tensors under the Triton interpreter."""
from __future__ import annotations

import contextlib
import threading

import torch
from mojo_opset.backend import OpImpl

from mojo_opset.environ import getenv

# the Triton interpreter is not thread-safe: kernels run under it one at a time
_INTERPRETER_LOCK = threading.RLock()


_ON = ("1", "true", "yes", "on")
_NULL = contextlib.nullcontext()


_interpret_values: dict[str, bool] = {}


def interpreter_on() -> bool:
    raw = getenv("TRITON_INTERPRET")
    on = _interpret_values.get(raw)
    if on is None:
        on = _interpret_values[raw] = raw.strip().lower() in _ON
    return on


def unavailable_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc}); pip install 'mojo-opset[triton]'"
    if interpreter_on():
        return None
    try:
        if torch.cuda.is_available():
            return None
    except Exception:  # a broken CUDA install reads as no device
        pass
    return ("no CUDA device; set TRITON_INTERPRET=1 before triton is imported to run the kernels "
            "on CPU tensors in the Triton interpreter")


def device_reason(t: torch.Tensor) -> str | None:
    """Why a tensor's device cannot be served (None when it can)."""
    dev = t.device.type
    if dev == "cuda":
        if interpreter_on():
            return "the Triton interpreter is on (TRITON_INTERPRET=1): CUDA tensors are not served"
        return None
    if dev == "cpu":
        if interpreter_on():
            return None
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)"
    return f"device type {dev!r} is not served (cuda, or cpu under the Triton interpreter)"


def nvidia_ptx(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device may use NVIDIA inline PTX (a CUDA device, not ROCm; the
    interpreter runs the kernels' plain-Triton paths instead)."""
    return t.device.type == "cuda" and torch.version.hip is None


def serialized():
    """A context that runs a kernel launch alone when the interpreter is on (a no-op on a GPU)."""
    if not interpreter_on() or torch.compiler.is_compiling():   # a graph cannot hold a lock
        return _NULL
    return _INTERPRETER_LOCK


FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)


def eager() -> bool:
    """Nothing is tracing this call, so the ``torch.library`` op may be skipped: such an op costs
    tens of microseconds of host time per call and is needed only where something traces the call
    (a ``torch.compile`` graph, a dispatch mode such as FakeTensorMode) or for autograd."""
    if torch.compiler.is_compiling():
        return False
    return _dispatch_modes is not None and _dispatch_modes() == 0


class TritonOpImpl(OpImpl):
    """The OpImpl base of this backend: float data, served on CUDA (or CPU under the interpreter)."""

    dtypes = FLOATS
    graph_capturable = True     # no host synchronisation anywhere in the launchers

    def state_key(self):
        return interpreter_on()

    def extra_reasons(self, call) -> list[str]:
        r = device_reason(call.tensor)
        return [r] if r else []
