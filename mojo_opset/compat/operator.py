"""``MojoOperator``: the base of the compatibility classes.

It reproduces the original's construction protocol: calling a core class (``MojoMoE(...)``) reads
``MOJO_BACKEND`` and returns an instance of that backend's class, ``Cls._registry.get(name)`` gives
any backend's class, and :meth:`forward_diff_with` compares two implementations.  Each instance
passes its pinned backend id (``_backend``; None = this library's per-call selection) as the
``backend=`` argument of the functional ops it calls.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..dispatch import select_backend
from .backends import BackendRegistry
from .diff import check_tol_diff

__all__ = ["MojoOperator"]

_FACTORY_KWARGS = ("device", "dtype")


def check_size(name: str, value, lo: int = 1) -> int:
    """A constructor's integer argument, validated with an error naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


class MojoOperator(nn.Module):
    """Base class.  The original's operator classes are declared with ``core=True``; the class of a
    backend (``MojoMoE._registry.get("torch")``) is a subclass that pins that backend."""

    _backend: str | None = None      # backend id pinned at construction; None: selected per call
    _op: str = "moe_forward"         # the op whose selection rules resolve backend names

    def __init_subclass__(cls, core: bool = False, **kwargs):
        super().__init_subclass__(**kwargs)
        if core:            # one of the original's operator classes: it gets its own registry
            cls._registry = BackendRegistry(cls)

    def __new__(cls, *args, **kwargs):
        if "_registry" in cls.__dict__:
            # as in the original, the environment picks the implementation class at construction
            cls = cls._registry.get(os.environ.get("MOJO_BACKEND"),
                                    source=f"{cls.__name__}: MOJO_BACKEND (read at construction)")
        return super().__new__(cls)

    def __init__(self, **kwargs):
        super().__init__()
        unknown = sorted(set(kwargs) - set(_FACTORY_KWARGS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {unknown}; besides its "
                            f"sizes it accepts the tensor factory arguments {list(_FACTORY_KWARGS)}")
        self.tensor_factory_kwargs = {k: v for k, v in kwargs.items() if v is not None}

    # ------------------------------------------------------------------ the original's class API

    @classmethod
    def get_registry(cls) -> BackendRegistry:
        return cls._registry

    @classmethod
    def get_backend_impl(cls, backend_name: str | None = None, *, strict: bool = False):
        return cls._registry.get(backend_name, strict=strict)

    @classmethod
    def get_registered_backends(cls) -> tuple[str, ...]:
        return cls._registry.registered_backends()

    @property
    def backend(self) -> str | None:
        """The backend id this instance pins (None: chosen per call by this library's rules)."""
        return self._backend

    def _factory(self, dtype=None) -> dict:
        """Factory arguments for a new tensor: the constructor's device, and ``dtype`` if given
        (else the constructor's dtype)."""
        out = {"device": self.tensor_factory_kwargs.get("device")}
        out["dtype"] = dtype if dtype is not None else self.tensor_factory_kwargs.get("dtype")
        return out

    def _apply(self, fn, recurse=True):
        # parameters marked ``force_dtype`` (the original's convention) keep that dtype across
        # .to(dtype) / .half(): the router weight and smoothing factors stay fp32, scales bf16
        out = super()._apply(fn, recurse)
        for p in self.parameters():
            want = getattr(p, "force_dtype", None)
            if want is not None and p.dtype != want:
                p.data = p.data.to(want)
        return out

    # ------------------------------------------------------------------ comparison

    def _effective_backend(self, args, kwargs) -> str:
        if self._backend is not None:
            return self._backend
        t = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        return select_backend(self._op, t.device.type if t is not None else "cpu")

    def forward_diff_with(self, other_op: "MojoOperator", *args, atol=1e-2, rtol=1e-2, ptol=1.0, random_seed: int = 42,
                          mixed_tol=False, **kwargs):
        """Run ``self`` and ``other_op`` on copies of the same inputs and assert the outputs agree.

        Tolerances as in the original: ``atol``/``rtol`` per element; ``ptol < 1`` passes when at
        least that fraction of elements is close; ``mixed_tol=True`` uses 2**-6 absolute below 1 in
        magnitude and 2**-6 relative above; each may be a tuple, one entry per output of a tuple.
        The failure message reports the match ratio, the match / mismatch / total counts and the
        largest absolute and relative differences.  Returns ``self``'s output.  Both forwards run
        without autograd (a forward comparison: kernels without a backward serve it).

        Raises NotImplementedError, as the original does, when both run the same implementation."""
        if type(self) is type(other_op) or (isinstance(other_op, MojoOperator) and self._effective_backend(
                args, kwargs) == other_op._effective_backend(args, kwargs)):
            raise NotImplementedError(
                f"No dedicated backend for {type(self).__name__}: both operands resolve to the same "
                "implementation, so there is nothing to compare")

        def copies():
            return (tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args),
                    {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

        with torch.no_grad():
            torch.manual_seed(random_seed)   # both sides start from the same RNG state
            a, k = copies()
            out = self.forward(*a, **k)
            torch.manual_seed(random_seed)
            a, k = copies()
            ref = other_op.forward(*a, **k)
        if out is None or ref is None:
            raise AssertionError("forward_diff_with: both forwards must return a value")
        check_tol_diff(out, ref, atol, rtol, ptol, mixed_tol)
        return out
