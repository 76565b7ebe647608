"""Per-call backend selection, capability checks, fallback and introspection.

Selection, highest precedence first: the ``backend=`` argument, :func:`use_backend`,
``MOJO_BACKEND_<OP>``, ``MOJO_BACKEND``, then the default for the tensors' device.
The chosen backend's :class:`~mojo_opset.backend.OpImpl` answers, from its declarations and
its extra reasons, why it cannot serve the typed call; any reason sends the call to the reference
(logged once per (op, backend, reason) and counted), or raises under :func:`strict` /
``MOJO_STRICT=1``.  Decisions are cached by the call's signature.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections import Counter
from typing import Any, Callable, Iterator

import torch

from . import registry
from .contract.names import OPS, env_name
from .environ import env_flag, getenv, raw_values
from .modes import _ctx as _ctx_deterministic
from .modes import deterministic, is_deterministic  # noqa: F401  (re-exported: part of the selection state)
from .registry import REFERENCE
from .suggest import did_you_mean

log = logging.getLogger("mojo_opset")

__all__ = ["BackendError", "StrictFallbackError", "use_backend", "strict", "is_strict", "deterministic",
           "is_deterministic", "dispatch", "decide",
           "select_backend", "explain", "reset_stats", "fallback_counts", "last_served", "clear_caches",
           "implementation"]


class BackendError(RuntimeError):
    """An unknown or unavailable backend was requested."""


class StrictFallbackError(RuntimeError):
    """Strict mode: a call would have fallen back to the reference."""


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo at import time
    (that imports triton, before a test session can turn the Triton interpreter on)."""
    fn._dynamo_marked_constant = True
    return fn


_ctx_backend: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mojo_backend", default=None)
_ctx_strict: contextvars.ContextVar[bool | None] = contextvars.ContextVar("mojo_strict", default=None)


def _check_backend_arg(name, what: str) -> None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"{what} must be a backend id (str) or None, got {type(name).__name__}")


@contextlib.contextmanager
def use_backend(name: str | None, ops: str | list[str] | tuple[str, ...] | None = None) -> Iterator[None]:
    """Route calls in this context to backend ``name`` (all ops, or only ``ops``).

    ``use_backend(None)`` clears the choice of an outer context (for ``ops``, or for every op), so
    ``MOJO_BACKEND*`` and the device defaults apply again."""
    _check_backend_arg(name, "use_backend(name)")
    if ops is not None:
        ops = [ops] if isinstance(ops, str) else list(ops)
        for op in ops:
            _check_op(op)
    outer = dict(_ctx_backend.get() or {})
    if ops is None:
        outer = {} if name is None else {"*": name}
    else:
        for op in ops:
            if name is None:
                outer.pop(op, None)
                if "*" in outer:
                    outer[op] = None        # clears the outer "*" for this op only
            else:
                outer[op] = name
    token = _ctx_backend.set(outer)
    try:
        yield
    finally:
        _ctx_backend.reset(token)


@contextlib.contextmanager
def strict(enabled: bool = True) -> Iterator[None]:
    """Make any fallback to the reference an error naming its reasons."""
    token = _ctx_strict.set(enabled)
    try:
        yield
    finally:
        _ctx_strict.reset(token)


@_assume_constant_result  # compiled graphs fix the mode at trace time (no ContextVar in graphs)
def is_strict() -> bool:
    v = _ctx_strict.get()
    if v is not None:
        return v
    return env_flag("MOJO_STRICT")


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}{did_you_mean(op, OPS)}; ops are {', '.join(OPS)}")


# --------------------------------------------------------------------------- selection

_ENV_OPS = {env_name(op): op for op in OPS}
_ENV_NAMES = {op: env_name(op) for op in OPS}
_warned_env: set = set()


_env_size = [-1]


def _warn_misspelled_env() -> None:
    """Warn once per name about ``MOJO_BACKEND_<X>`` variables that name no op (they would be ignored).
    Rescans only when the number of environment variables changed (a cheap check per call)."""
    if len(os.environ) == _env_size[0]:
        return
    _env_size[0] = len(os.environ)
    for var in list(os.environ):
        if var.startswith("MOJO_BACKEND_") and var not in _ENV_OPS and var not in _warned_env:
            _warned_env.add(var)
            log.warning("mojo_opset: %s names no op and is ignored%s; valid: %s", var,
                        did_you_mean(var, _ENV_OPS), ", ".join(_ENV_OPS))


def _requested(op: str, explicit: str | None) -> tuple[str | None, str]:
    if explicit is not None:
        return explicit, "backend= argument"
    ctx = _ctx_backend.get()
    if ctx:
        if op in ctx:
            if ctx[op] is not None:
                return ctx[op], "use_backend()"
        elif "*" in ctx:
            return ctx["*"], "use_backend()"
    var = _ENV_NAMES.get(op) or env_name(op)
    v = getenv(var).strip()
    if v:
        return v, var
    v = getenv("MOJO_BACKEND").strip()
    if v:
        return v, "MOJO_BACKEND"
    return None, "default"


_default_cache: dict[str, str] = {}


def _default_for_device(device_type: str) -> str:
    hit = _default_cache.get(device_type)
    if hit is not None:
        return hit
    candidates = []
    for name, entry in registry.backend_entries().items():
        if entry.backend is not None and device_type in entry.backend.default_for:
            candidates.append((entry.backend.default_priority, name, entry))
    chosen = REFERENCE
    for _, name, entry in sorted(candidates):
        if entry.availability()[0]:
            chosen = name
            break
    _default_cache[device_type] = chosen
    return chosen


_selected: dict[tuple, str] = {}


@_assume_constant_result  # compiled graphs fix the choice at trace time (no ContextVar in graphs)
def select_backend(op: str, device_type: str, explicit: str | None = None) -> str:
    """The backend id that a call of ``op`` on ``device_type`` tensors goes to (no capability check)."""
    _check_backend_arg(explicit, "backend")
    _warn_misspelled_env()
    name, source = _requested(op, explicit)
    hit = _selected.get((name, device_type))
    if hit is not None:
        return hit
    if name is None or name.strip().lower() == "auto":
        chosen = _default_for_device(device_type)
    else:
        chosen = _resolve(name, source)
    _selected[(name, device_type)] = chosen
    return chosen


def _resolve(name: str, source: str) -> str:
    canonical = registry.canonical_name(name)
    if canonical == REFERENCE:
        return REFERENCE
    entry = registry.get_entry(canonical)
    if entry is None:
        raise BackendError(registry.unknown_backend_message(name, source))
    ok, reason = entry.availability()
    if not ok:
        raise BackendError(f"backend {canonical!r} (from {source}) is unavailable: {reason}")
    try:
        entry.impls()  # load here, outside any compiled graph (this function runs eagerly under compile)
    except RuntimeError as exc:
        raise BackendError(str(exc)) from exc
    return canonical


# --------------------------------------------------------------------------- bookkeeping

class _Stats:
    """Fallback and served counters (process-wide) and the last call of each op (per thread)."""

    def __init__(self):
        self.fallbacks: Counter = Counter()
        self.served: Counter = Counter()
        self.logged: set = set()
        self.compiled_calls = 0


_stats = _Stats()
_stats_lock = threading.Lock()
_local = threading.local()
_decision_cache: dict[Any, tuple] = {}     # key -> (impl's state_key, impl, decision)
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_DECISION_CACHE_MAX = 4096


def _last() -> dict:
    d = getattr(_local, "last", None)
    if d is None:
        d = _local.last = {}
    return d


def clear_caches() -> None:
    _default_cache.clear()
    _decision_cache.clear()
    _selected.clear()


registry.on_change(clear_caches)


def reset_stats() -> None:
    """Forget last-served records (of this thread), counters and the once-per-reason log memory
    (misspelled ``MOJO_BACKEND_<OP>`` variables are warned about again)."""
    global _stats
    with _stats_lock:
        _stats = _Stats()
    _local.last = {}
    _warned_env.clear()
    _env_size[0] = -1


@_assume_constant_result   # runs once per trace: a counter changed inside the graph would be a
def _count_traced_call() -> bool:   # guard, failing (recompiling) on every later call
    _stats.compiled_calls += 1
    return True


def _record(op: str, backend: str, served_by: str, reasons: tuple[str, ...]) -> None:
    _record_all(((op, backend, served_by, reasons),))


def _record_all(records) -> None:
    """Count served calls ``(op, backend, served_by, reasons)`` and keep each op's last, under one lock."""
    if torch.compiler.is_compiling():
        _count_traced_call()
        return
    collected = getattr(_local, "collect", None)
    if collected is not None:
        collected.extend(records)
        if collected.mute:
            return
    last = _last()
    with _stats_lock:
        for op, backend, served_by, reasons in records:
            last[op] = (backend, served_by, reasons)
            _stats.served[(op, backend, served_by)] += 1
            if served_by == "fallback":
                for r in reasons:
                    _stats.fallbacks[(op, backend, r)] += 1
                    if (op, backend, r) not in _stats.logged:
                        _stats.logged.add((op, backend, r))
                        log.warning("mojo_opset: %s on backend %r falls back to the reference: %s", op, backend, r)


class _Collected(list):
    mute = False


@contextlib.contextmanager
def collecting(mute: bool = False) -> Iterator[list]:
    """Collects ``(op, backend, served_by, reasons)`` of every call this thread records inside;
    ``mute``: only collect them (not counted, not the last served), e.g. while capturing a graph."""
    outer = getattr(_local, "collect", None)
    records = _Collected()
    records.mute = mute or bool(outer is not None and outer.mute)
    _local.collect = records
    try:
        yield records
    finally:
        _local.collect = outer
        if outer is not None:
            outer.extend(records)


def record_again(records) -> None:
    """Count collected calls once more (a graph replay of them serves the same implementations)."""
    _record_all(records)


def selection_state() -> tuple:
    """Everything besides a call's signature that selection and decisions read: the context's
    backend, strict and deterministic choices and their environment variables, undecoded (a cache
    keyed by call signatures adds this to its key)."""
    ctx = _ctx_backend.get()
    return (frozenset(ctx.items()) if ctx else None, _ctx_strict.get(), _ctx_deterministic.get(),
            raw_values(_STATE_VARS))


_STATE_VARS = ("MOJO_BACKEND", "MOJO_STRICT", "MOJO_DETERMINISTIC", *_ENV_NAMES.values())


def _as_record(rec) -> dict:
    backend, served_by, reasons = rec
    return {"backend": backend, "served_by": served_by, "reasons": list(reasons)}


def last_served(op: str | None = None):
    """``{op: {"backend", "served_by", "reasons"}}`` for the last eager call of each op made by the
    calling thread (or of ``op``).  Calls traced into a compiled graph are not recorded."""
    last = _last()
    if op is not None:
        rec = last.get(op)
        return _as_record(rec) if rec else {}
    return {k: _as_record(v) for k, v in last.items()}


def fallback_counts() -> dict[tuple[str, str, str], int]:
    """``{(op, backend, reason): count}`` over all threads."""
    with _stats_lock:
        return dict(_stats.fallbacks)


class Explanation(dict):
    """What served each op's last call (this thread), plus fallback counts; prints as a report."""

    def __str__(self) -> str:
        lines = ["op                  backend   served by    reasons"]
        for op in OPS:
            rec = self["last"].get(op)
            if rec:
                lines.append(f"{op:<19} {rec['backend']:<9} {rec['served_by']:<12} {'; '.join(rec['reasons'])}")
        if not self["last"]:
            if self["compiled_calls"]:
                lines.append("(no eager call recorded: calls inside torch.compile'd graphs are decided at trace "
                             "time and not recorded; run the function once eagerly to see what serves it)")
            else:
                lines.append(f"(no call recorded yet in thread {self['thread']!r})")
        if self["fallbacks"]:
            lines.append("fallbacks (op, backend, reason): count")
            for (op, be, r), n in sorted(self["fallbacks"].items()):
                lines.append(f"  {op} / {be} / {r}: {n}")
        return "\n".join(lines)


def explain() -> Explanation:
    """Last implementation per op (this thread's calls), fallback counts and reasons (all threads)."""
    with _stats_lock:
        return Explanation(last=last_served(), fallbacks=dict(_stats.fallbacks),
                           served={"/".join(k): v for k, v in _stats.served.items()},
                           compiled_calls=_stats.compiled_calls, thread=threading.current_thread().name)


# --------------------------------------------------------------------------- dispatch

def implementation(backend: str, op: str):
    """The OpImpl of ``op`` in ``backend`` (None for the reference or when not overridden)."""
    if backend == REFERENCE:
        return None
    entry = registry.get_entry(backend)
    return None if entry is None else entry.impls().get(op)


def decide(call, backend: str | None = None, grad_rebuilt: bool = False):
    """``(backend_id, impl_or_None, served_by, reasons)`` for a typed call, without running it.

    ``grad_rebuilt``: the caller rebuilds the differentiable outputs itself (gating), so a call
    that needs grad does not require an implementation with a backward.  A repeated call (same
    backend, signature, grad mode and implementation state) is one dictionary lookup: the signature
    holds every tensor's ``requires_grad``, so the whole decision, autograd part included, is cached;
    the implementation comes with the cached decision (registering a backend empties the cache)."""
    op = call.op
    name = select_backend(op, call.tensor.device.type, backend)
    if name == REFERENCE:
        return REFERENCE, None, "reference", ()
    key = None
    if not _is_compiling():     # a compiled graph decides once, at trace time
        try:
            key = (name, _grad_enabled(), grad_rebuilt, call.signature())
            hit = _decision_cache.get(key)      # one hash of the key per call
            if hit is not None and hit[1].state_key() == hit[0]:
                return hit[2]
        except Exception:  # a signature part or a state that cannot be built or hashed: no caching
            key = None
    impl = registry.get_entry(name).impls().get(op)
    if impl is None:
        return name, None, "no override", ()
    decision = _decide(call, name, impl, grad_rebuilt)
    if key is not None:
        try:
            state = impl.state_key()
        except Exception:
            return decision
        if len(_decision_cache) >= _DECISION_CACHE_MAX:
            _decision_cache.clear()
        _decision_cache[key] = (state, impl, decision)
    return decision


def _decide(call, name: str, impl, grad_rebuilt: bool):
    try:
        reasons = tuple(impl.declared_reasons(call, registry.get_entry(name).backend.device_types))
    except Exception as exc:  # a capability check must not crash the caller
        reasons = (f"capability check raised {type(exc).__name__}: {exc}",)
    if not reasons and not grad_rebuilt:
        if not impl.supports_autograd:
            if call.needs_grad():
                reasons = ("autograd: this implementation has no backward",)
        elif getattr(call, "deterministic", False) and not impl.deterministic_backward and call.needs_grad():
            reasons = ("deterministic=True with autograd: this implementation's backward is not batch-invariant",)
    if reasons:
        return name, impl, "fallback", reasons
    return name, impl, "kernel", ()


def dispatch(call, reference: Callable[[Any], Any], *, backend: str | None = None, grad_rebuilt: bool = False):
    """Run the typed ``call`` on the selected backend, or ``reference(call)``.

    Returns ``(result, served_by)`` where served_by is ``"kernel"``, ``"fallback"``,
    ``"no override"`` or ``"reference"``."""
    name, impl, served_by, reasons = decide(call, backend, grad_rebuilt)
    if served_by == "fallback" and is_strict():
        raise StrictFallbackError(f"strict mode: {call.op} on backend {name!r} would fall back to the "
                                  f"reference: {'; '.join(reasons)}")
    _record(call.op, name, served_by, reasons)
    if served_by == "kernel":
        return impl.forward(call), served_by
    return reference(call), served_by
