"""Per-call backend selection, capability checks, fallback and introspection.

Selection, highest precedence first: the ``backend=`` argument, :func:`use_backend`,
``MOJO_BACKEND_<OP>``, ``MOJO_BACKEND``, then the default for the tensors' device.
The chosen backend's :class:`~mojo_opset.backend.OpImpl` answers the reasons it cannot serve the
call; any reason sends the call to the reference (logged once per (op, backend, reason) and
counted), or raises under :func:`strict` / ``MOJO_STRICT=1``.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from . import registry
from .ops.names import OPS, env_name
from .registry import REFERENCE

log = logging.getLogger("mojo_opset")

__all__ = ["BackendError", "StrictFallbackError", "use_backend", "strict", "is_strict", "dispatch",
           "select_backend", "explain", "reset_stats", "fallback_counts", "last_served", "clear_caches"]


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


@contextlib.contextmanager
def use_backend(name: str | None, ops: str | list[str] | tuple[str, ...] | None = None) -> Iterator[None]:
    """Route calls in this context to backend ``name`` (all ops, or only ``ops``).

    ``use_backend(None)`` clears an outer context (env vars and defaults apply again)."""
    if ops is not None:
        ops = [ops] if isinstance(ops, str) else list(ops)
        for op in ops:
            _check_op(op)
    outer = dict(_ctx_backend.get() or {})
    if ops is None:
        outer = {"*": name}
    else:
        for op in ops:
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
    return os.environ.get("MOJO_STRICT", "0").strip().lower() in ("1", "true", "yes", "on")


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")


# --------------------------------------------------------------------------- selection

def _requested(op: str, explicit: str | None) -> tuple[str | None, str]:
    if explicit is not None:
        return explicit, "backend= argument"
    ctx = _ctx_backend.get()
    if ctx:
        if op in ctx:
            return ctx[op], "use_backend()"
        if "*" in ctx:
            return ctx["*"], "use_backend()"
    v = os.environ.get(env_name(op), "").strip()
    if v:
        return v, env_name(op)
    v = os.environ.get("MOJO_BACKEND", "").strip()
    if v:
        return v, "MOJO_BACKEND"
    return None, "default"


def _describe_registered() -> str:
    parts = [f"{REFERENCE} (available)"]
    for name, entry in sorted(registry.backend_entries().items()):
        ok, reason = entry.availability()
        parts.append(f"{name} (available)" if ok else f"{name} (unavailable: {reason})")
    return "; ".join(parts)


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


@_assume_constant_result  # compiled graphs fix the choice at trace time (no ContextVar in graphs)
def select_backend(op: str, device_type: str, explicit: str | None = None) -> str:
    """The backend id that a call of ``op`` on ``device_type`` tensors goes to (no capability check)."""
    name, source = _requested(op, explicit)
    if name is None or name.lower() == "auto":
        name = _default_for_device(device_type)
    if name == REFERENCE:
        return REFERENCE
    entry = registry.get_entry(name)
    if entry is None:
        raise BackendError(f"unknown backend {name!r} (from {source}); registered: {_describe_registered()}")
    ok, reason = entry.availability()
    if not ok:
        raise BackendError(f"backend {name!r} (from {source}) is unavailable: {reason}; "
                           f"registered: {_describe_registered()}")
    try:
        entry.impls()  # load here, outside any compiled graph (this function runs eagerly under compile)
    except RuntimeError as exc:
        raise BackendError(str(exc)) from exc
    return name


# --------------------------------------------------------------------------- bookkeeping

@dataclass
class _Stats:
    last: dict[str, dict[str, Any]] = field(default_factory=dict)
    fallbacks: Counter = field(default_factory=Counter)
    served: Counter = field(default_factory=Counter)
    logged: set = field(default_factory=set)


_stats = _Stats()
_stats_lock = threading.Lock()
_reason_cache: dict[Any, tuple[str, ...]] = {}


def clear_caches() -> None:
    _default_cache.clear()
    _reason_cache.clear()


def reset_stats() -> None:
    """Forget last-served records, counters and the once-per-reason log memory."""
    global _stats
    with _stats_lock:
        _stats = _Stats()


def _record(op: str, backend: str, served_by: str, reasons: tuple[str, ...]) -> None:
    if torch.compiler.is_compiling():
        return
    with _stats_lock:
        _stats.last[op] = {"backend": backend, "served_by": served_by, "reasons": list(reasons)}
        _stats.served[(op, backend, served_by)] += 1
        if served_by == "fallback":
            for r in reasons:
                _stats.fallbacks[(op, backend, r)] += 1
                if (op, backend, r) not in _stats.logged:
                    _stats.logged.add((op, backend, r))
                    log.warning("mojo_opset: %s on backend %r falls back to the reference: %s", op, backend, r)


def last_served(op: str | None = None):
    """``{op: {"backend", "served_by", "reasons"}}`` for the last call of each op (or of ``op``)."""
    with _stats_lock:
        if op is not None:
            return dict(_stats.last.get(op, {}))
        return {k: dict(v) for k, v in _stats.last.items()}


def fallback_counts() -> dict[tuple[str, str, str], int]:
    """``{(op, backend, reason): count}``."""
    with _stats_lock:
        return dict(_stats.fallbacks)


class Explanation(dict):
    """What served each op's last call, plus fallback counts; prints as a readable report."""

    def __str__(self) -> str:
        lines = ["op                  backend   served by    reasons"]
        for op in OPS:
            rec = self["last"].get(op)
            if rec:
                lines.append(f"{op:<19} {rec['backend']:<9} {rec['served_by']:<12} {'; '.join(rec['reasons'])}")
        if self["fallbacks"]:
            lines.append("fallbacks (op, backend, reason): count")
            for (op, be, r), n in sorted(self["fallbacks"].items()):
                lines.append(f"  {op} / {be} / {r}: {n}")
        return "\n".join(lines)


def explain() -> Explanation:
    """Last implementation per op, fallback counts and reasons."""
    with _stats_lock:
        return Explanation(last={k: dict(v) for k, v in _stats.last.items()},
                           fallbacks=dict(_stats.fallbacks),
                           served={"/".join(k): v for k, v in _stats.served.items()})


# --------------------------------------------------------------------------- dispatch

def _needs_grad(call: dict) -> bool:
    if not torch.is_grad_enabled():
        return False
    for v in call.values():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            return True
    return False


def implementation(backend: str, op: str):
    """The OpImpl of ``op`` in ``backend`` (None for the reference or when not overridden)."""
    if backend == REFERENCE:
        return None
    entry = registry.get_entry(backend)
    return None if entry is None else entry.impls().get(op)


def decide(op: str, device_type: str, call: dict, backend: str | None = None,
           grad_rebuilt: bool = False):
    """Return ``(backend_id, impl_or_None, served_by, reasons)`` for a call, without running it."""
    name = select_backend(op, device_type, backend)
    if name == REFERENCE:
        return REFERENCE, None, "reference", ()
    entry = registry.get_entry(name)
    impl = entry.impls().get(op)
    if impl is None:
        return name, None, "no override", ()
    served_devices = entry.backend.device_types
    if served_devices and device_type not in served_devices:
        return name, impl, "fallback", (f"device {device_type!r}: backend {name!r} serves "
                                        f"{', '.join(served_devices)} tensors",)
    reasons: tuple[str, ...]
    key = None
    try:
        key = impl.cache_key(**call)
    except Exception:
        key = None
    if key is not None and (name, op, key) in _reason_cache:
        reasons = _reason_cache[(name, op, key)]
    else:
        try:
            reasons = tuple(impl.reasons(**call))
        except Exception as exc:  # a capability check must not crash the caller
            reasons = (f"capability check raised {type(exc).__name__}: {exc}",)
        if key is not None:
            _reason_cache[(name, op, key)] = reasons
    if not reasons and not impl.supports_autograd and not grad_rebuilt and _needs_grad(call):
        reasons = ("autograd: this implementation has no backward",)
    if reasons:
        return name, impl, "fallback", reasons
    return name, impl, "kernel", ()


def dispatch(op: str, reference: Callable[..., Any], call: dict, *, device: torch.device | str,
             backend: str | None = None, grad_rebuilt: bool = False):
    """Run ``op`` for ``call`` on the selected backend, or on ``reference``.

    Returns ``(result, served_by)`` where served_by is ``"kernel"``, ``"fallback"``,
    ``"no override"`` or ``"reference"``."""
    device_type = torch.device(device).type
    name, impl, served_by, reasons = decide(op, device_type, call, backend, grad_rebuilt)
    if served_by == "fallback" and is_strict():
        raise StrictFallbackError(f"strict mode: {op} on backend {name!r} would fall back to the "
                                  f"reference: {'; '.join(reasons)}")
    _record(op, name, served_by, reasons)
    if served_by == "kernel":
        return impl.forward(**call), served_by
    return reference(**call), served_by
