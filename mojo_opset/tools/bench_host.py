"""Host time per eager call for ``mojo-opset bench``: what a training loop, ``generate`` or any caller
that does not capture a CUDA graph pays on the CPU for each ``mo.moe_forward``.

Host time per call = the wall time of ``n`` back-to-back calls divided by ``n``, with no device
synchronisation inside the loop (the minimum over repetitions; the device is synchronised between
repetitions).  ``n`` is kept small enough that the device's launch queue never fills up, since a
full queue would make the loop wait for the GPU and measure the GPU instead.  The same function is
timed compiled (``torch.compile(fullgraph=True)``), under ``mo.deterministic()`` and with the
replay of repeated calls from CUDA graphs turned off (``MOJO_EAGER_GRAPHS=0``: every call launches
its kernels, as the first call of a signature does).
"""
from __future__ import annotations

import contextlib
import os
import time

import torch

CALLS = 40      # per repetition: a few hundred launches at most, well under the launch queue's depth
REPS = 7


def per_call_us(fn, device: torch.device, calls: int = CALLS, reps: int = REPS, warmup: int = 3) -> float:
    """Minimum over ``reps`` of the host microseconds per call of ``calls`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return best / calls * 1e6


def device_us(fn, device: torch.device, calls: int = CALLS) -> float | None:
    """Device time per call of the same back-to-back loop (CUDA events), for comparison."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / calls * 1e3


def host_times(x, w, K: int, backend: str, device: torch.device, compiled: bool = True) -> dict:
    """Host (and device) microseconds per ``mo.moe_forward`` call on ``x``: eager, compiled, deterministic."""
    import mojo_opset as mo

    def forward(inp):
        return mo.moe_forward(inp, w.gate_weight, w.w13, w.w2, K, backend=backend, **w.routing)

    out = {"T": x.shape[0], "calls": CALLS, "eager_us": per_call_us(lambda: forward(x), device),
           "eager_device_us": device_us(lambda: forward(x), device)}
    with mo.deterministic():
        out["deterministic_eager_us"] = per_call_us(lambda: forward(x), device)
    with _env("MOJO_EAGER_GRAPHS", "0"):
        out["launch_eager_us"] = per_call_us(lambda: forward(x), device)
    if compiled:
        try:
            # every model's `forward` shares one code object: without a reset, later models' calls
            # would first fail the guards of the earlier models' compiled entries
            torch.compiler.reset()
            cf = torch.compile(forward, fullgraph=True)
            out["compiled_us"] = per_call_us(lambda: cf(x), device)
        except Exception as exc:  # a compiler problem is reported, not fatal to the benchmark
            out["compiled_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return out


@contextlib.contextmanager
def _env(var: str, value: str):
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old


def describe(model: str, rec: dict) -> str:
    parts = [f"host time per eager moe_forward call ({model}, T={rec['T']}): {rec['eager_us']:.1f} us"]
    if rec.get("eager_device_us") is not None:
        parts.append(f"device {rec['eager_device_us']:.1f} us")
    if "compiled_us" in rec:
        parts.append(f"compiled {rec['compiled_us']:.1f} us")
    elif "compiled_error" in rec:
        parts.append(f"compiled: {rec['compiled_error']}")
    parts.append(f"deterministic {rec['deterministic_eager_us']:.1f} us")
    if "launch_eager_us" in rec:
        parts.append(f"without graph replay {rec['launch_eager_us']:.1f} us")
    return "; ".join(parts)
