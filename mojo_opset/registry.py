"""Backend discovery through the ``mojo_opset.backends`` entry-point group.

The core never imports a backend module by name: every backend, in-tree or a vendor's, is found
here.  A plugin that fails to import or to construct is recorded as unavailable with the error as
its reason; it never breaks ``import mojo_opset``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Mapping

from .backend import Backend, OpImpl

ENTRY_POINT_GROUP = "mojo_opset.backends"
REFERENCE = "torch"

__all__ = ["BackendEntry", "ENTRY_POINT_GROUP", "REFERENCE", "backend_entries", "get_entry",
           "register_backend", "unregister_backend", "available_backends", "refresh"]


@dataclass
class BackendEntry:
    name: str
    backend: Backend | None = None
    source: str = ""                      # "entry point mod:attr" or "registered"
    error: str | None = None              # import/construct failure
    _impls: Mapping[str, OpImpl] | None = field(default=None, repr=False)
    _availability: tuple[bool, str | None] | None = field(default=None, repr=False)

    def availability(self) -> tuple[bool, str | None]:
        if self.error is not None:
            return False, self.error
        if self._availability is None:
            try:
                reason = self.backend.unavailable_reason()
            except Exception as exc:  # a probe must never break the caller
                reason = f"availability probe raised {type(exc).__name__}: {exc}"
            self._availability = (reason is None, reason)
        return self._availability

    def impls(self) -> Mapping[str, OpImpl]:
        """The op overrides (loads the backend on first use)."""
        if self._impls is None:
            ok, reason = self.availability()
            if not ok:
                raise RuntimeError(f"backend {self.name!r} is unavailable: {reason}")
            try:
                impls = dict(self.backend.load())
            except Exception as exc:
                self._availability = (False, f"load() raised {type(exc).__name__}: {exc}")
                raise RuntimeError(f"backend {self.name!r} failed to load: {exc}") from exc
            for op, impl in impls.items():
                if not isinstance(impl, OpImpl):
                    raise TypeError(f"backend {self.name!r}: load() must map op names to OpImpl, "
                                    f"got {type(impl).__name__} for {op!r}")
            self._impls = impls
        return self._impls


_lock = threading.RLock()
_entries: dict[str, BackendEntry] | None = None
_registered: dict[str, BackendEntry] = {}


def _instantiate(obj: Any) -> Backend:
    if isinstance(obj, Backend):
        return obj
    if callable(obj):
        made = obj()
        if isinstance(made, Backend):
            return made
        raise TypeError(f"entry point returned {type(made).__name__}, expected a mojo_opset.Backend")
    raise TypeError(f"entry point target is {type(obj).__name__}, expected a Backend subclass, "
                    "instance or factory")


def _discover() -> dict[str, BackendEntry]:
    found: dict[str, BackendEntry] = {}
    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # pragma: no cover - broken metadata
        eps = []
    for ep in eps:
        if ep.name == REFERENCE:
            continue  # the reference id is reserved for the core
        src = f"entry point {ep.value}"
        try:
            backend = _instantiate(ep.load())
            if backend.name and backend.name != ep.name:
                raise ValueError(f"backend declares name {backend.name!r} but its entry point is "
                                 f"named {ep.name!r}")
            backend.name = ep.name
            found[ep.name] = BackendEntry(ep.name, backend, src)
        except Exception as exc:
            found[ep.name] = BackendEntry(ep.name, None, src,
                                          error=f"failed to import: {type(exc).__name__}: {exc}")
    return found


_merged: dict[str, BackendEntry] | None = None


def backend_entries() -> dict[str, BackendEntry]:
    """All known backends except the reference, by id (cached; do not mutate)."""
    global _entries, _merged
    merged = _merged
    if merged is not None:
        return merged
    with _lock:
        if _entries is None:
            _entries = _discover()
        merged = dict(_entries)
        merged.update(_registered)
        _merged = merged
        return merged


def refresh() -> None:
    """Forget discovered backends (re-read entry points on next use)."""
    global _entries, _merged
    with _lock:
        _entries = None
        _merged = None
    from . import dispatch
    dispatch.clear_caches()


def get_entry(name: str) -> BackendEntry | None:
    return backend_entries().get(name)


def register_backend(backend: Backend, name: str | None = None) -> None:
    """Register a backend programmatically (tests, notebooks); entry points are the normal path."""
    name = name or backend.name
    if not name or name == REFERENCE:
        raise ValueError(f"backend name must be a non-empty id other than {REFERENCE!r}, got {name!r}")
    backend.name = name
    global _merged
    with _lock:
        _registered[name] = BackendEntry(name, backend, "registered")
        _merged = None
    from . import dispatch
    dispatch.clear_caches()


def unregister_backend(name: str) -> None:
    global _merged
    with _lock:
        _registered.pop(name, None)
        _merged = None
    from . import dispatch
    dispatch.clear_caches()


def available_backends() -> dict[str, dict[str, Any]]:
    """``{id: {"available": bool, "reason": str | None, "ops": [...], "source": str}}``."""
    out: dict[str, dict[str, Any]] = {
        REFERENCE: {"available": True, "reason": None, "source": "core reference",
                    "ops": sorted(_op_names())}}
    for name, entry in sorted(backend_entries().items()):
        ok, reason = entry.availability()
        ops: list[str] = []
        if ok:
            try:
                ops = sorted(entry.impls())
            except Exception as exc:
                ok, reason = False, str(exc)
        out[name] = {"available": ok, "reason": reason, "source": entry.source, "ops": ops}
    return out


def _op_names():
    from .ops.names import OPS
    return OPS
