"""Backend discovery through the ``mojo_opset.backends`` entry-point group.

The core never imports a backend module by name: every backend, in-tree or a vendor's, is found
here.  A plugin that fails to import or to construct, or that was written for another major version
of the plugin API, is recorded as unavailable with the reason; it never breaks ``import mojo_opset``.

Backend ids are case-insensitive; the original mojo_opset's names are aliases (``torch_npu`` is
``npu``) and its ``ixformer`` backend is listed, unavailable, with the reason.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Mapping

from .backend import API_VERSION, Backend, OpImpl
from .contract.names import OPS
from .suggest import did_you_mean

ENTRY_POINT_GROUP = "mojo_opset.backends"
REFERENCE = "torch"
# the original mojo_opset's backend names that are spelled differently here
ALIASES = {"torch_npu": "npu"}
# backends of the original mojo_opset that have no implementation here: listed with the reason
KNOWN_ELSEWHERE = {"ixformer": "the ixformer backend of the original mojo_opset (Iluvatar GPUs) has no "
                               "implementation in this library; its calls can use 'torch' or 'triton'"}

__all__ = ["BackendEntry", "ENTRY_POINT_GROUP", "REFERENCE", "ALIASES", "backend_entries", "get_entry",
           "canonical_name", "register_backend", "unregister_backend", "available_backends", "refresh",
           "on_change", "unknown_backend_message"]


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
                reason = _api_reason(self.backend) or self.backend.unavailable_reason()
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
                impl.backend_name = self.name
            self._impls = impls
        return self._impls


def _api_reason(backend: Backend) -> str | None:
    want = str(getattr(backend, "api_version", API_VERSION))
    if want.split(".")[0] != API_VERSION.split(".")[0]:
        return (f"written for plugin API {want}, this mojo_opset has plugin API {API_VERSION} "
                "(another major version); update the plugin")
    return None


_lock = threading.RLock()
_listeners: list = []


def on_change(fn) -> None:
    """Call ``fn()`` whenever the set of backends changes (the dispatcher clears its caches)."""
    _listeners.append(fn)


def _changed() -> None:
    for fn in _listeners:
        fn()

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
        name = ep.name.lower()
        if name == REFERENCE:
            continue  # the reference id is reserved for the core
        src = f"entry point {ep.value}"
        try:
            backend = _instantiate(ep.load())
            if backend.name and backend.name.lower() != name:
                raise ValueError(f"backend declares name {backend.name!r} but its entry point is "
                                 f"named {ep.name!r}")
            backend.name = name
            found[name] = BackendEntry(name, backend, src)
        except Exception as exc:
            found[name] = BackendEntry(name, None, src, error=f"failed to import: {type(exc).__name__}: {exc}")
    for name, reason in KNOWN_ELSEWHERE.items():
        found.setdefault(name, BackendEntry(name, None, "original mojo_opset name", error=reason))
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
    _changed()


def canonical_name(name: str) -> str:
    """The backend id for a user-given name: case-insensitive, original mojo_opset aliases resolved."""
    key = name.strip().lower()
    return ALIASES.get(key, key)


def get_entry(name: str) -> BackendEntry | None:
    return backend_entries().get(canonical_name(name))


def unknown_backend_message(name: str, source: str) -> str:
    """A short error for an unknown backend id, with the closest valid name."""
    entries = backend_entries()
    listed = [f"{REFERENCE} (available)"] + [
        f"{n} ({'available' if e.availability()[0] else 'unavailable'})" for n, e in sorted(entries.items())]
    return (f"unknown backend {name!r} (from {source}){did_you_mean(name, [REFERENCE, *entries, *ALIASES])}; "
            f"known: {', '.join(listed)}; reasons: `mojo-opset info`")


def register_backend(backend: Backend, name: str | None = None) -> None:
    """Register a backend programmatically (tests, notebooks); entry points are the normal path."""
    name = (name or backend.name or "").lower()
    if not name or name == REFERENCE:
        raise ValueError(f"backend name must be a non-empty id other than {REFERENCE!r}, got {name!r}")
    backend.name = name
    global _merged
    with _lock:
        _registered[name] = BackendEntry(name, backend, "registered")
        _merged = None
    _changed()


def unregister_backend(name: str) -> None:
    global _merged
    with _lock:
        _registered.pop(name.lower(), None)
        _merged = None
    _changed()


def available_backends() -> dict[str, dict[str, Any]]:
    """``{id: {"available": bool, "reason": str | None, "ops": [...], "source": str,
    "capabilities": {op: declared capabilities}}}``."""
    out: dict[str, dict[str, Any]] = {
        REFERENCE: {"available": True, "reason": None, "source": "core reference",
                    "ops": sorted(_op_names()), "capabilities": {}}}
    for name, entry in sorted(backend_entries().items()):
        ok, reason = entry.availability()
        ops: list[str] = []
        if ok:
            try:
                ops = sorted(entry.impls())
            except Exception as exc:
                ok, reason = False, str(exc)
        caps = {op: entry.impls()[op].capabilities() for op in ops}
        out[name] = {"available": ok, "reason": reason, "source": entry.source, "ops": ops, "capabilities": caps}
    return out


def _op_names():
    return OPS
