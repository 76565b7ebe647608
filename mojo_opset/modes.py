"""The batch-invariant mode: :func:`deterministic` and ``MOJO_DETERMINISTIC=1``.

Under it each token's outputs (and its input gradient) are bit-identical whatever the token count
and whatever other tokens share the call, and identical run to run: the typed calls carry
``deterministic=True`` (an implementation that does not declare the option declines them), and the
core's own GEMMs (router, shared experts, the reference experts) run on fixed-shape row blocks
(:mod:`mojo_opset.reference.invariant`).  It sits below the reference so that the core math can
read it where no call object carries it (the shared experts module, the router GEMM).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from .environ import env_flag

__all__ = ["deterministic", "is_deterministic"]

_ctx: contextvars.ContextVar[bool | None] = contextvars.ContextVar("mojo_deterministic", default=None)


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo at import time."""
    fn._dynamo_marked_constant = True
    return fn


@contextlib.contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Batch-invariant, run-to-run identical MoE ops in this context (``enabled=False`` turns an
    outer context or ``MOJO_DETERMINISTIC=1`` off)."""
    token = _ctx.set(bool(enabled))
    try:
        yield
    finally:
        _ctx.reset(token)


@_assume_constant_result  # a compiled graph keeps the mode it was traced with (no ContextVar in graphs)
def is_deterministic() -> bool:
    """Whether :func:`deterministic` (or ``MOJO_DETERMINISTIC=1``) is on here."""
    v = _ctx.get()
    if v is not None:
        return v
    return env_flag("MOJO_DETERMINISTIC")


def resolve(flag: bool | None) -> bool:
    """An explicit ``deterministic=`` argument, or the mode of the calling context when None."""
    return is_deterministic() if flag is None else bool(flag)
