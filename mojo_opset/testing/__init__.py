"""Helpers for downstream tests: parametrize over backends and assert closeness to the reference.

    import mojo_opset as mo
    from mojo_opset.testing import assert_close_to_reference

    def test_layer(mojo_backend):                       # fixture from the pytest plugin
        assert_close_to_reference(mo.moe_forward, x, gate_weight, w13, w2, 2, backend=mojo_backend)

Tolerances follow the policy of ``mojo-opset compare`` (docs/accuracy.md).
"""
from __future__ import annotations

import contextlib

from .accuracy import (Diff, Tolerance, compare_tensors, flatten_outputs, gemm_tolerance, quant_tolerance,
                       routing_tolerance, tie_eps)
from .routing import compare_routing

__all__ = ["assert_close_to_reference", "assert_close", "assert_routing_close", "backends", "tolerance_for",
           "Tolerance", "Diff", "compare_tensors", "compare_routing", "gemm_tolerance", "routing_tolerance",
           "quant_tolerance", "tie_eps"]


def tolerance_for(dtype, *, atol=None, rtol=None, max_mismatch=None) -> Tolerance:
    """The GEMM-chain tolerance of ``dtype`` (docs/accuracy.md), with any field overridden."""
    t = gemm_tolerance(dtype) if dtype.is_floating_point else Tolerance(0.0, 0.0, 0.0)
    return Tolerance(t.atol if atol is None else atol, t.rtol if rtol is None else rtol,
                     t.max_mismatch if max_mismatch is None else max_mismatch)


def assert_close(got, want, *, atol=None, rtol=None, max_mismatch=None, name="out") -> None:
    """Compare two outputs (a tensor or nested tuples/lists/dicts of tensors) with the per-dtype
    tolerance of each tensor (integer tensors exactly); raise AssertionError describing every
    output that differs."""
    g, w = flatten_outputs(got, name), flatten_outputs(want, name)
    if [n for n, _ in g] != [n for n, _ in w]:
        raise AssertionError(f"output structure differs: {[n for n, _ in g]} vs {[n for n, _ in w]}")
    problems = []
    for (n, a), (_, b) in zip(g, w):
        d = compare_tensors(n, a, b, tolerance_for(b.dtype, atol=atol, rtol=rtol, max_mismatch=max_mismatch))
        if not d.ok:
            problems.append(d.describe())
    if problems:
        raise AssertionError("not close to the reference:\n  " + "\n  ".join(problems))


def assert_close_to_reference(fn, *args, backend=None, strict=False, atol=None, rtol=None, max_mismatch=None,
                              **kwargs):
    """Call ``fn(*args, **kwargs)`` on ``backend`` and on the torch reference and assert the outputs
    are close (see :func:`assert_close`).  Returns the backend's output.

    The backend is selected with ``mo.use_backend`` around the call, so ``fn`` can be a mojo_opset
    function, a module's forward, or any code that calls them.  ``backend=None`` keeps the current
    selection (environment variables, device default).  ``strict=True`` fails when a call falls back
    to the reference, naming the reasons (proves a kernel served it)."""
    import mojo_opset as mo

    with mo.use_backend("torch"):
        want = fn(*args, **kwargs)
    ctx = mo.use_backend(backend) if backend is not None else contextlib.nullcontext()
    with ctx, (mo.strict() if strict else contextlib.nullcontext()):
        got = fn(*args, **kwargs)
    label = f"backend {backend!r}" if backend is not None else "the selected backend"
    try:
        assert_close(got, want, atol=atol, rtol=rtol, max_mismatch=max_mismatch)
    except AssertionError as exc:
        raise AssertionError(f"{label}: {exc}") from None
    return got


def assert_routing_close(topk_ids, ref_ids, scores, **routing) -> None:
    """Assert routing ids agree with the reference's except at genuine near-ties (docs/accuracy.md).

    ``scores``: the reference's fp32 scores ``[T, E]``; ``routing``: ``expert_bias``,
    ``num_expert_groups``, ``num_limited_groups``, ``group_score``, ``logits_dtype``, ``forced``."""
    d, _accepted = compare_routing(topk_ids, ref_ids, scores, **routing)
    if not d.ok:
        raise AssertionError(d.describe())


def backends(include_reference: bool = True, available_only: bool = True) -> list[str]:
    """Backend ids for ``pytest.mark.parametrize`` (the ``mojo_backend`` fixture does this for you)."""
    import mojo_opset as mo

    return [n for n, rec in mo.available_backends().items()
            if (include_reference or n != "torch") and (rec["available"] or not available_only)]
