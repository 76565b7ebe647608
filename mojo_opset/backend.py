"""The plugin API: what a backend package implements.

A backend is discovered through the entry-point group ``mojo_opset.backends``; the entry point
names a :class:`Backend` subclass (or an instance, or a zero-argument factory returning one).
In-tree backends use exactly this API, so a vendor's package has the same powers as ours.

A backend overrides only the ops it accelerates.  For each op it provides an :class:`OpImpl` that
*declares* its capabilities (devices, dtypes, options, alignment, limits, autograd) and receives
the op's typed call object (:mod:`mojo_opset.contract`).  The generic reasons follow from the
declarations; :meth:`OpImpl.extra_reasons` adds the backend's own.  Any reason sends the call to the
core reference path (a *fallback*).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import torch

__all__ = ["API_VERSION", "Backend", "OpImpl", "op_impl"]

# The plugin API version, "major.minor".  A plugin declaring another major version is listed as
# unavailable with that reason, not loaded.  0.2: typed call objects and declared capabilities.
API_VERSION = "0.2"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


class OpImpl:
    """One backend's implementation of one op.

    Declarations (class attributes; the defaults are the most conservative):

    * ``op``: the op id (``mojo_opset.contract.OPS``).
    * ``device_types``: tensor device types served; empty means the backend's ``device_types``
      (and if that is empty too, any device).
    * ``dtypes``: dtypes of the call's data tensor (``call.tensor``: logits, x, permuted_x or
      expert_out) served; empty means any.
    * ``options``: the options (``call.active_options()``) implemented with non-default values; a
      call using any other option is declined with a reason.
    * ``required_alignment``: (experts ops) the group alignment the kernel needs from permute.
    * ``limits``: ``{size name: maximum}`` over ``call.sizes()`` (e.g. ``{"num_experts": 1024}``).
    * ``supports_autograd``: if False, a call where a tensor input requires grad is declined (the
      differentiable reference serves it); gating is exempt (the core keeps the kernel's values and
      takes the gradient from the reference formulas).
    * ``deterministic_backward``: declaring the ``deterministic`` option covers the forward; a
      ``deterministic=True`` call that needs grad is served only if the backward is batch-invariant
      and run-to-run identical too (each token's input gradient independent of its batch mates,
      weight gradients without atomics).
    * ``graph_capturable``: the forward never synchronises with the device and keeps no host value
      that depends on tensor data, so a CUDA graph of it replays correctly for any input values of
      the same shapes (eager calls of small token counts are then replayed from a graph, see
      :mod:`mojo_opset.functional.eager_graphs`).

    Override :meth:`extra_reasons` for anything the declarations cannot say (it must be cheap, must
    not synchronise with the device, and must be a pure function of ``call.signature()`` plus
    :meth:`state_key`: the dispatcher caches decisions), and :meth:`forward`.
    """

    op: ClassVar[str] = ""
    device_types: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = ()
    options: frozenset = frozenset()
    required_alignment: int = 1
    limits: Mapping[str, int] = {}
    supports_autograd: bool = False
    deterministic_backward: bool = False
    graph_capturable: bool = False
    backend_name: str = ""        # set by the registry when the backend loads

    def extra_reasons(self, call) -> list[str]:
        return []

    def state_key(self) -> Any:
        """Backend state the reasons depend on besides the call (e.g. whether an interpreter is on)."""
        return None

    def forward(self, call) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ derived, not overridden

    def declared_reasons(self, call, backend_device_types: tuple[str, ...] = ()) -> list[str]:
        """The reasons that follow from the declarations, then :meth:`extra_reasons`."""
        out = []
        devices = self.device_types or backend_device_types
        dev = call.device.type
        if devices and dev not in devices:
            out.append(f"device {dev!r}: serves {', '.join(devices)} tensors")
        if self.dtypes and call.dtype not in self.dtypes:
            out.append(f"dtype {_dtype_name(call.dtype)}: serves "
                       f"{', '.join(_dtype_name(d) for d in self.dtypes)}")
        for name, value in call.active_options().items():
            if name not in self.options:
                out.append(f"option {name}={_show(value)} is not implemented")
        if self.limits:
            sizes = call.sizes()
            for name, most in self.limits.items():
                if name in sizes and sizes[name] > most:
                    out.append(f"{name} = {sizes[name]} is over this kernel's limit of {most}")
        out.extend(self.extra_reasons(call))
        return out

    def capabilities(self) -> dict[str, Any]:
        """The declarations as plain data (for ``mojo-opset info`` and docs)."""
        return {"device_types": list(self.device_types), "dtypes": [_dtype_name(d) for d in self.dtypes],
                "options": sorted(self.options), "required_alignment": self.required_alignment,
                "limits": dict(self.limits), "supports_autograd": self.supports_autograd,
                "deterministic_backward": self.deterministic_backward,
                "graph_capturable": self.graph_capturable}


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<{_dtype_name(value.dtype)} tensor {list(value.shape)}>"
    return repr(value)


def op_impl(op: str, forward: Callable[[Any], Any], reasons: Callable[[Any], list[str]] | None = None,
            supports_autograd: bool = False, options=(), dtypes=(), device_types=()) -> OpImpl:
    """Build an :class:`OpImpl` from plain functions of the call object."""

    class _Fn(OpImpl):
        pass

    _Fn.op = op
    _Fn.supports_autograd = supports_autograd
    _Fn.options = frozenset(options)
    _Fn.dtypes = tuple(dtypes)
    _Fn.device_types = tuple(device_types)
    impl = _Fn()
    impl.forward = forward  # type: ignore[method-assign]
    if reasons is not None:
        impl.extra_reasons = reasons  # type: ignore[method-assign]
    return impl


class Backend:
    """A set of op overrides for some hardware.

    Subclasses set ``name`` and ``description`` and implement:

    * :meth:`unavailable_reason` -- None when usable on this machine, else a human reason
      (missing package, no device).  Must not raise and should import heavy dependencies lazily.
    * :meth:`load` -- return ``{op_name: OpImpl}``; called once, only when available.

    ``api_version``: the plugin API version the backend was written for (``API_VERSION``); another
    major version makes it unavailable.  ``device_types``: the tensor device types the backend
    serves (an OpImpl may narrow it); a call on another device is declined with a reason; empty
    means any device.  ``default_for``: device types for which this backend is a default candidate
    (in order of ``default_priority``, lower first).
    """

    name: str = ""
    description: str = ""
    api_version: str = API_VERSION
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
