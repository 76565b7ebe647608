"""The plugin API: what a backend package implements.

A backend is discovered through the entry-point group ``mojo_opset.backends``; the entry point
names a :class:`Backend` subclass (or an instance, or a zero-argument factory returning one).
In-tree backends use exactly this API, so a vendor's package has the same powers as ours.

A backend overrides only the ops it accelerates.  For each op it provides an :class:`OpImpl`
whose :meth:`OpImpl.reasons` answers, per call, why it cannot serve that call (an empty list
means it serves it).  Any reason sends the call to the core reference path (a *fallback*).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

__all__ = ["Backend", "OpImpl", "op_impl"]


class OpImpl:
    """One backend's implementation of one op.

    ``reasons(**call)`` and ``forward(**call)`` receive the op's canonical keyword arguments
    (see ``mojo_opset.ops.registry.OP_SIGNATURES``); ``reasons`` must be cheap and must not
    synchronise with the device.

    ``supports_autograd``: if False, the dispatcher declines calls where a tensor input requires
    grad (the reference, which is differentiable, serves them) -- except for ops whose core wrapper
    rebuilds the differentiable outputs itself (gating).
    """

    op: str = ""
    supports_autograd: bool = False

    def reasons(self, **call: Any) -> list[str]:  # pragma: no cover - trivial default
        return []

    def forward(self, **call: Any) -> Any:
        raise NotImplementedError

    def cache_key(self, **call: Any):
        """Optional: a hashable key such that equal keys imply equal ``reasons``.

        Returning None (the default) disables decision caching for this op."""
        return None


def op_impl(op: str, forward: Callable[..., Any], reasons: Callable[..., list[str]] | None = None,
            supports_autograd: bool = False) -> OpImpl:
    """Build an :class:`OpImpl` from plain functions."""

    class _Fn(OpImpl):
        pass

    impl = _Fn()
    impl.op = op
    impl.supports_autograd = supports_autograd
    impl.forward = forward  # type: ignore[method-assign]
    if reasons is not None:
        impl.reasons = reasons  # type: ignore[method-assign]
    return impl


class Backend:
    """A set of op overrides for some hardware.

    Subclasses set ``name`` and ``description`` and implement:

    * :meth:`unavailable_reason` -- None when usable on this machine, else a human reason
      (missing package, no device).  Must not raise and should import heavy dependencies lazily.
    * :meth:`load` -- return ``{op_name: OpImpl}``; called once, only when available.

    ``device_types``: the tensor device types the backend serves; a call on another device is
    declined with a reason.  ``default_for``: device types for which this backend is a default
    candidate (in order of ``default_priority``, lower first).
    """

    name: str = ""
    description: str = ""
    device_types: tuple[str, ...] = ()
    default_for: tuple[str, ...] = ()
    default_priority: int = 100

    def unavailable_reason(self) -> str | None:
        return None

    def load(self) -> Mapping[str, OpImpl]:
        return {}

    def versions(self) -> dict[str, str]:
        """Versions of the backend's dependencies, for ``mojo-opset info``."""
        return {}
