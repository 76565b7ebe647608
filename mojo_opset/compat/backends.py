"""Backend names of the original mojo_opset and its per-class backend registry.

The original picks one implementation class per operator at construction, from ``MOJO_BACKEND``
(``torch``, ``ttx``, ``torch_npu``, ``ixformer``, any case), and its test-suites ask a class's
registry for another backend's class (``MojoMoE._registry.get("torch")``) to compare against.
Here a backend name resolves through this library's registry (aliases, case-insensitive ids and
availability live there), and the class for a backend is a subclass of the compatibility class
that pins that backend id on every call it makes.
"""
from __future__ import annotations

import threading

from ..dispatch import BackendError, select_backend
from ..registry import available_backends

__all__ = ["resolve_backend", "BackendRegistry"]

# class-name prefixes in the original's style ("TorchMoE", "TTXMoE"); other ids are capitalised
_CLASS_PREFIX = {"torch": "Torch", "ttx": "TTX", "npu": "NPU", "triton": "Triton"}


def resolve_backend(name, op: str, source: str = "a backend name") -> str | None:
    """This library's backend id for a backend name of the original (None or "auto": chosen per call).

    Unknown and unavailable names raise :class:`mojo_opset.BackendError` naming the reason (the
    original silently fell back to the platform's first backend); ``source`` says where the name
    came from."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str or None, got {type(name).__name__}")
    key = name.strip()
    if not key or key.lower() == "auto":
        return None
    try:
        # the registry resolves aliases (torch_npu -> npu) and case, and explains unavailability
        return select_backend(op, "cpu", key)
    except BackendError as exc:
        raise BackendError(f"{source} {name!r}: {exc}") from None


class BackendRegistry:
    """The original's ``_registry`` of one operator class: backend name -> implementation class."""

    def __init__(self, core_cls):
        self._core = core_cls
        self._classes: dict[str, type] = {}
        self._lock = threading.Lock()

    def get_core_op_cls(self):
        return self._core

    def get(self, backend_name: str | None = None, *, strict: bool = False, source: str | None = None):
        """The class whose instances run on ``backend_name`` (None: the class that selects per call).

        ``strict`` is accepted for the original's signature; an unknown or unavailable name is
        always an error here."""
        ident = resolve_backend(backend_name, self._core._op,
                                source or f"{self._core.__name__}._registry.get: backend")
        if ident is None:
            return self._core
        with self._lock:
            cls = self._classes.get(ident)
            if cls is None:
                stem = self._core.__name__[len("Mojo"):]
                name = _CLASS_PREFIX.get(ident, ident[:1].upper() + ident[1:]) + stem
                cls = type(self._core)(name, (self._core,), {"_backend": ident, "__module__": self._core.__module__,
                                                             "__qualname__": name})
                self._classes[ident] = cls
        return cls

    def registered_backends(self) -> tuple[str, ...]:
        """The available backend ids, the reference last (as the original lists its fallback last)."""
        avail = [n for n, rec in available_backends().items() if rec["available"] and n != "torch"]
        return (*avail, "torch")
