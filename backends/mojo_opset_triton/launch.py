"""Kernel launches at a fraction of ``kernel[grid](...)``'s host cost, once a kernel has run.

``JITFunction.run`` binds and specialises every argument, builds its cache key as a string, reads
the runtime knobs and prepares launch metadata for hooks on every call: tens of microseconds of
host time per launch, which is most of an eager decode step.  :func:`launch` keys the compiled
kernel by what Triton specialises on (each tensor's dtype and 16-byte alignment, each specialised
integer's value, the constexprs and the launch options, the current device) and, on a hit, calls
the compiled launcher directly.  The first launch of a key, launches with profiler hooks attached,
and the interpreter take Triton's own path; any failure of the direct path turns it off for the
process (and is logged once).  ``MOJO_TRITON_FAST_LAUNCH=0`` turns it off.
"""
from __future__ import annotations

import logging

import torch
from triton.runtime.jit import JITFunction

from mojo_opset.environ import env_flag, getenv

try:
    from triton import knobs as _knobs
except ImportError:  # a Triton without knobs: its own launch path only
    _knobs = None

log = logging.getLogger("mojo_opset")

__all__ = ["launch", "enabled"]

_INT, _RUNTIME_INT, _OTHER = 0, 1, 2
_state = {"broken": False}
_kernels: dict = {}       # (id of the JITFunction, number of positional arguments) -> _Signature
_handles: dict = {}       # key -> (run, function, packed_metadata)
_MAX_HANDLES = 4096


def enabled() -> bool:
    if _state["broken"]:
        return False
    return env_flag("MOJO_TRITON_FAST_LAUNCH") if getenv("MOJO_TRITON_FAST_LAUNCH") else True


class _Signature:
    """Per kernel: how each positional argument enters the key, and the constexpr names after them."""

    def __init__(self, fn, n_args: int):
        params = fn.params
        self.kinds = []
        for p in params[:n_args]:
            if p.is_constexpr:
                self.kinds.append(_OTHER)
            elif p.do_not_specialize:
                self.kinds.append(_RUNTIME_INT)   # only its integer width is part of the key
            else:
                self.kinds.append(_INT)           # its value (covers Triton's ==1 and %16 cases)
        self.tail = tuple(p.name for p in params[n_args:])


def _arg_key(kind: int, a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if kind == _RUNTIME_INT and type(a) is int:
        return -0x80000000 <= a <= 0x7FFFFFFF
    return a


def _hooks_attached() -> bool:
    """Launch hooks (a profiler) want Triton's own path, which calls them with launch metadata."""
    if _knobs is None:
        return True
    rt = _knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):   # an empty HookChain calls nothing
            return True
    return False


def launch(fn, grid, *args, **meta) -> None:
    """``fn[grid](*args, **meta)``: positional runtime arguments, constexprs and options as keywords."""
    # under the interpreter ``triton.jit`` gives an InterpretedFunction: no launcher to call
    if not isinstance(fn, JITFunction) or not enabled() or _hooks_attached():
        fn[grid](*args, **meta)
        return
    # kernels are module-level objects: their id is stable (a JITFunction hashes its source each time)
    sig = _kernels.get((id(fn), len(args)))
    if sig is None:
        sig = _kernels[(id(fn), len(args))] = _Signature(fn, len(args))
    device = torch.cuda.current_device()
    key = (id(fn), device, tuple(map(_arg_key, sig.kinds, args)), tuple(meta.items()))
    hit = _handles.get(key)
    if hit is None:
        _first_launch(fn, grid, args, meta, key)
        return
    run, function, packed = hit
    g = (*grid, 1, 1)
    values = args + tuple(meta[name] for name in sig.tail)
    try:
        run(g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(device), function, packed, None, None, None,
            *values)
    except Exception as exc:   # an API this code does not know: Triton's own path from now on
        _state["broken"] = True
        log.warning("mojo_opset: direct Triton launches turned off (%s: %s)", type(exc).__name__, exc)
        fn[grid](*args, **meta)


def _first_launch(fn, grid, args, meta, key) -> None:
    kernel = fn[grid](*args, **meta)
    if kernel is None:
        return
    if hasattr(kernel, "result"):        # compiled asynchronously
        kernel = kernel.result()
    try:
        run = kernel.run
        handle = (run, kernel.function, kernel.packed_metadata)
    except Exception:  # noqa: BLE001  (another Triton's kernel object: keep its own path)
        return
    if len(_handles) >= _MAX_HANDLES:
        _handles.clear()
    _handles[key] = handle
