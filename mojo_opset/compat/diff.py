"""The original's tolerance check behind ``forward_diff_with``, with its statistics.

Three modes, as in the original: every element within ``atol + rtol * |ref|``; with ``ptol < 1``
at least a fraction ``ptol`` of the elements within it; with ``mixed_tol`` an absolute 2**-6 where
``|ref| < 1`` and a relative 2**-6 elsewhere.  NaN never matches (as there).  Tuples and lists of
outputs are compared element by element, each tolerance argument either one value or one per output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DiffStats", "check_tol_diff"]

MIXED_TOL = 2.0 ** -6


@dataclass(frozen=True)
class DiffStats:
    """One output's comparison: ``match`` of ``total`` elements within tolerance."""
    name: str
    match: int
    total: int
    max_abs: float
    max_rel: float
    first_mismatch: tuple | None

    @property
    def mismatch(self) -> int:
        return self.total - self.match

    @property
    def match_ratio(self) -> float:
        return self.match / self.total if self.total else 1.0

    def describe(self) -> str:
        where = "" if self.first_mismatch is None else f", first mismatch at {list(self.first_mismatch)}"
        return (f"{self.name}: match_ratio={self.match_ratio:.5%} (match={self.match} / mismatch={self.mismatch} / "
                f"total={self.total}), max_abs={self.max_abs:.6g}, max_rel={self.max_rel:.6g}{where}")


def _pick(value, i: int):
    if isinstance(value, (tuple, list)):
        if i >= len(value):
            raise IndexError(f"tolerance {value!r} has no entry for output {i}")
        return value[i]
    return value


def _stats(name: str, out: torch.Tensor, ref: torch.Tensor, atol, rtol, mixed: bool) -> DiffStats:
    if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor):
        raise AssertionError(f"{name}: expected tensors, got {type(out).__name__} and {type(ref).__name__}")
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"{name}: shape {list(out.shape)} differs from the reference's {list(ref.shape)}")
    o, r = out.detach().to(ref.device, torch.float64), ref.detach().to(torch.float64)
    err = (o - r).abs()
    if mixed:
        small = r.abs() < 1.0
        limit = torch.where(small, torch.full_like(r, MIXED_TOL), MIXED_TOL * r.abs())
    else:
        limit = atol + rtol * r.abs()
    ok = (err <= limit) | (o == r)          # equal infinities match; NaN never does
    finite = torch.isfinite(err)
    e = torch.where(finite, err, torch.zeros_like(err))
    rel = e / r.abs().clamp_min(torch.finfo(torch.float64).tiny)
    total = ref.numel()
    first = None
    if not bool(ok.all()):
        first = tuple(int(i) for i in (~ok).nonzero()[0])
    return DiffStats(name, int(ok.sum()), total, float(e.max()) if total else 0.0,
                     float(rel.max()) if total else 0.0, first)


def check_tol_diff(out, ref, atol=1e-2, rtol=1e-2, ptol=1.0, mixed_tol=False, *, name: str = "output"):
    """Assert ``out`` is close to ``ref`` under the original's rules; returns the list of
    :class:`DiffStats` (one per tensor) when it is, raises AssertionError describing them when not."""
    if isinstance(out, (tuple, list)):
        if not isinstance(ref, (tuple, list)) or len(out) != len(ref):
            raise AssertionError(f"{name}: {len(out)} outputs, the reference has "
                                 f"{len(ref) if isinstance(ref, (tuple, list)) else 'one'}")
        stats = []
        for i, (o, r) in enumerate(zip(out, ref)):
            stats += check_tol_diff(o, r, _pick(atol, i), _pick(rtol, i), _pick(ptol, i), _pick(mixed_tol, i),
                                    name=f"{name}[{i}]")
        return stats
    if not mixed_tol and ptol > 1.0:
        raise ValueError(f"ptol must be <= 1.0, got {ptol}")
    s = _stats(name, out, ref, atol, rtol, bool(mixed_tol))
    need = 1.0 if mixed_tol else ptol
    if s.match_ratio < need or (need == 1.0 and s.mismatch):
        rule = ("mixed_tol (2**-6 absolute below 1, relative above)" if mixed_tol
                else f"atol={atol:g}, rtol={rtol:g}" + (f", ptol={ptol:%}" if ptol != 1.0 else ""))
        raise AssertionError(f"{s.describe()}; needs {rule}")
    return [s]
