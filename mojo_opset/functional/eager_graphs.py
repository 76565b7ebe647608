"""Eager MoE forwards of small token counts replayed from CUDA graphs.

An eager ``moe_forward`` at decode sizes is bound by the host: a handful of kernel launches, a
router GEMM and Python bookkeeping cost several hundred microseconds of CPU time while the GPU
needs tens.  A caller that repeats a call (the same layer at the same token count: every decode
step of ``generate``) gets, from the second repetition on, a CUDA graph of the whole forward that
this module captured: the call copies ``x`` into the graph's input, replays the graph and returns
copies of its outputs.

When a call is replayed, and why the replay is exact:

* eager CUDA calls only (not under ``torch.compile`` or inside another graph capture), without
  autograd (no grad mode, or no input requiring grad), without expert parallelism or
  ``forced_expert_ids``, of at most :data:`MAX_TOKENS` tokens, or more when the call's activations
  (``tokens x token_bytes``, the caller's estimate) fit ``MOJO_EAGER_GRAPH_MB`` (default
  :data:`BUDGET_MB`): the graphs' memory pool keeps that much for as long as the graph is held, and
  a forward of a few thousand tokens of a small-expert model (Qwen3-30B-A3B at 2048 tokens: ~0.5 ms
  of GPU work) is as bound by its launches as a decode step;
* every op the first (eager) call dispatched was served by an implementation that declares
  ``graph_capturable`` (no host synchronisation, no host value read from tensor data), so the
  graph's work depends on nothing but the input's values and the tensors named in the key;
* the key holds x's shape, strides and dtype; the address, shape, strides and dtype of every other
  tensor argument (a graph reads its weights where they live: values changed in place are seen, a
  tensor at another address is another key); every other argument; the device, the current
  stream and the dispatcher's selection state (backend choice, strict, deterministic and their
  environment variables).  Registering a backend empties the cache.

Graphs of one stream share one memory pool: a replay's outputs are copied out in stream order
before any other replay on that stream can reuse the pool's memory.  At most :data:`MAX_GRAPHS`
graphs are kept (least recently used evicted).  ``MOJO_EAGER_GRAPHS=0`` turns the replay off.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .. import registry
from ..dispatch import collecting, implementation, record_again, selection_state
from ..environ import env_flag, env_int, raw_values

__all__ = ["MAX_TOKENS", "BUDGET_MB", "MAX_GRAPHS", "enabled", "budget_bytes", "clear", "stats",
           "cached_forward"]

MAX_TOKENS = 256        # always eligible (decode steps, small batches)
BUDGET_MB = 128         # larger calls: eligible while their estimated activations fit this
MAX_GRAPHS = 256
_UNSEEN, _SEEN, _NEVER = 0, 1, 2

_lock = threading.Lock()
_graphs: OrderedDict = OrderedDict()     # key -> _Entry
_state: dict = {}                        # key -> _SEEN / _NEVER (keys not captured yet)
_pools: dict = {}                        # (device, stream) -> graph pool handle
_counts = {"replays": 0, "captures": 0, "declined": 0}


class _Entry:
    __slots__ = ("graph", "static_x", "out", "records")

    def __init__(self, graph, static_x, out, records):
        self.graph, self.static_x, self.out, self.records = graph, static_x, out, records


def enabled() -> bool:
    """``MOJO_EAGER_GRAPHS`` (default on; 1/0, true/false, yes/no, on/off, anything else an error)."""
    return env_flag("MOJO_EAGER_GRAPHS", True)


def budget_bytes() -> int:
    """``MOJO_EAGER_GRAPH_MB`` (default :data:`BUDGET_MB`; 0: only calls of at most
    :data:`MAX_TOKENS` tokens) in bytes."""
    return env_int("MOJO_EAGER_GRAPH_MB", BUDGET_MB) << 20


def within_budget(tokens: int, token_bytes: int) -> bool:
    """Whether a call of ``tokens`` tokens of ``token_bytes`` activation bytes each may be captured."""
    return tokens <= MAX_TOKENS or tokens * token_bytes <= budget_bytes()


def clear() -> None:
    """Forget every captured graph (their memory returns to the caching allocator) and zero the counts."""
    with _lock:
        _graphs.clear()
        _state.clear()
        _pools.clear()
        _counts.update(dict.fromkeys(_counts, 0))


def stats() -> dict:
    """Captures, replays and declined captures so far, and the graphs held."""
    with _lock:
        return dict(_counts, graphs=len(_graphs))


registry.on_change(clear)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", torch.cuda.is_current_stream_capturing)


# environment variables a backend's kernels read to choose their path (not the backend): a change
# captures the call again
KERNEL_VARS = ("MOJO_DEQUANT_MB",)


def kernel_state() -> tuple:
    return raw_values(KERNEL_VARS)


def _key(x, tensors, scalars, token_bytes):
    """The cache key of an eligible call, or None when the call is not eligible (see the module
    docstring): x's checks first, then one pass over the other tensors (a non-tensor argument is
    left to the call's validation)."""
    if not x.is_cuda or x.dim() == 0:
        return None
    h = x.shape[-1]
    if h == 0 or torch.compiler.is_compiling() or _capturing():
        return None
    if not within_budget(x.numel() // h, token_bytes):
        return None
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return None
    keys = []
    for t in tensors:
        if t is None:
            keys.append(None)
        elif not isinstance(t, torch.Tensor) or (grad and t.requires_grad):
            return None
        else:
            keys.append((t.data_ptr(), t.shape, t.stride(), t.dtype))
    if not enabled():
        return None
    dev = x.device.index
    stream = _raw_stream(dev) if _raw_stream is not None else _stream(x.device)
    return (x.shape, x.stride(), x.dtype, dev, stream, tuple(keys), scalars, selection_state(), kernel_state())


def _capturable(records) -> bool:
    """Every dispatched op of the eager call ran a kernel that declares itself capturable."""
    for op, backend, served_by, _ in records:
        if served_by != "kernel":
            return False
        impl = implementation(backend, op)
        if impl is None or not getattr(impl, "graph_capturable", False):
            return False
    return bool(records)


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    if isinstance(out, dict):
        return {k: _clone(v) for k, v in out.items()}
    return out


def cached_forward(x: torch.Tensor, tensors: tuple, scalars: tuple, run, token_bytes: int = 1 << 62):
    """``run(x)``, replayed from a CUDA graph when the same call was seen before (see the module
    docstring).  ``tensors``: every tensor argument besides x (None allowed); ``scalars``: every
    other argument, hashable; ``token_bytes``: the call's activation bytes per token (the default
    admits no call over :data:`MAX_TOKENS` tokens).  ``run`` must not keep x beyond the call."""
    key = _key(x, tensors, scalars, token_bytes)
    if key is None:
        return run(x)
    try:
        hash(key)
    except TypeError:           # an unhashable argument: no cache
        return run(x)
    with _lock:
        entry = _graphs.get(key)
        if entry is not None:
            _graphs.move_to_end(key)
        state = _state.get(key, _UNSEEN)
    if entry is not None:
        entry.static_x.copy_(x)
        entry.graph.replay()
        record_again(entry.records)
        with _lock:
            _counts["replays"] += 1
        return _clone(entry.out)
    if state == _NEVER:
        return run(x)
    with collecting() as records:
        out = run(x)
    capturable = _capturable(records)
    if state == _UNSEEN or not capturable:
        with _lock:
            if len(_state) >= 4 * MAX_GRAPHS:
                _state.clear()
            _state[key] = _SEEN if capturable else _NEVER
        return out
    entry = _capture(x, run, records)
    with _lock:
        _state.pop(key, None)
        if entry is None:
            _state[key] = _NEVER
            _counts["declined"] += 1
        else:
            _graphs[key] = entry
            _counts["captures"] += 1
            while len(_graphs) > MAX_GRAPHS:
                _graphs.popitem(last=False)
    return out


def _capture(x, run, records):
    """A graph of ``run`` on a static copy of x, captured on a side stream into the stream's pool;
    None when the capture fails (the call's eager result stands)."""
    cur = torch.cuda.current_stream(x.device)
    pool_key = (x.device.index, cur.cuda_stream)
    with _lock:
        pool = _pools.get(pool_key)
        if pool is None:
            pool = _pools[pool_key] = torch.cuda.graph_pool_handle()
    static_x = x.detach().clone()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(x.device)
    side.wait_stream(cur)
    try:
        with torch.cuda.stream(side), collecting(mute=True):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                out = run(static_x)
            finally:
                graph.capture_end()
    except Exception:   # something in the call cannot be captured: run it eagerly from now on
        cur.wait_stream(side)
        return None
    cur.wait_stream(side)
    return _Entry(graph, static_x, out, tuple(records))
