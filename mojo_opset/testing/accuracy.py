"""Tolerance policy and comparison metrics shared by ``mojo-opset compare`` and the test helpers.

docs/accuracy.md explains every number here.  An element passes when
``|got - want| <= atol + rtol * |want|`` (NaN must meet NaN, +-inf the same inf); a tensor passes
when the fraction of failing elements is at most ``max_mismatch``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    max_mismatch: float = 0.0   # fraction of elements allowed outside atol + rtol*|want|

    def as_dict(self) -> dict:
        return asdict(self)

    def scaled(self, factor: float) -> "Tolerance":
        return Tolerance(self.atol * factor, self.rtol * factor, self.max_mismatch)


EXACT = Tolerance(0.0, 0.0, 0.0)

# Outputs of GEMM chains (experts, combine, MoE forward), by the activations' dtype: covers a
# different fp32 accumulation order and one rounding of each intermediate (h, silu*up, y) landing
# on the other side of a rounding boundary.  fp32 means IEEE fp32: a kernel that silently uses TF32
# (about 1e-3 relative error) fails.
GEMM = {
    torch.float32: Tolerance(atol=1e-4, rtol=1e-4, max_mismatch=0.0),
    torch.float16: Tolerance(atol=1e-3, rtol=2e-3, max_mismatch=1e-4),
    torch.bfloat16: Tolerance(atol=1e-2, rtol=1.6e-2, max_mismatch=1e-4),
}

# Routing scores and weights (always fp32 outputs), by the dtype of the logits the gating op sees
# (fp32 with the default fp32 router).  With fp32 logits only exp/division rounding differs.
ROUTING = {
    torch.float32: Tolerance(atol=1e-6, rtol=1e-5),
    torch.float16: Tolerance(atol=1e-4, rtol=2e-3),
    torch.bfloat16: Tolerance(atol=1e-3, rtol=1.6e-2),
}

# Near-tie margin for routing, relative to the compared choice values, by the logits' dtype:
# about 100 fp32 ulps, or 2 ulps of a half-precision format (a backend may compute scores of
# half-precision logits in that precision).
TIE_EPS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Quantized MoE: both sides quantize activations dynamically, and the spec lets a kernel differ by
# one in the last integer place of a quantized value (round-half-even of x/s computed in another
# order); one such flip moves an output by about s_x * |w|, so these are wider than GEMM's.
QUANT = {
    "w8a8_int8": Tolerance(atol=3e-2, rtol=3e-2, max_mismatch=1e-2),
    "w4a8_int4": Tolerance(atol=3e-2, rtol=3e-2, max_mismatch=1e-2),
    "w8a8_fp8_block": Tolerance(atol=6e-2, rtol=6e-2, max_mismatch=1e-2),
}


def gemm_tolerance(dtype: torch.dtype) -> Tolerance:
    return GEMM.get(dtype, GEMM[torch.float32])


def routing_tolerance(logits_dtype: torch.dtype) -> Tolerance:
    return ROUTING.get(logits_dtype, ROUTING[torch.float32])


def quant_tolerance(scheme: str, dtype: torch.dtype) -> Tolerance:
    """Weight-only schemes (``*a16*``) dequantize exactly, so they get the GEMM tolerance of the
    activations' dtype (doubled: the dequantized weight is rounded once more)."""
    if scheme in QUANT:
        q = QUANT[scheme]
        g = gemm_tolerance(dtype)
        return Tolerance(max(q.atol, g.atol), max(q.rtol, g.rtol), max(q.max_mismatch, g.max_mismatch))
    return gemm_tolerance(dtype).scaled(2.0)


def tie_eps(logits_dtype: torch.dtype) -> float:
    return TIE_EPS.get(logits_dtype, TIE_EPS[torch.float32])


@dataclass
class Diff:
    """The comparison of one output tensor."""
    name: str
    max_abs: float
    max_rel: float
    bad: int           # elements outside the tolerance (or a NaN/inf disagreement, or a shape/dtype error)
    total: int
    tolerance: Tolerance
    note: str = ""     # first offending element, or (prefixed "!") a structural problem
    unit: str = "elements"

    @property
    def mismatch(self) -> float:
        return self.bad / self.total if self.total else 0.0

    @property
    def ok(self) -> bool:
        return self.mismatch <= self.tolerance.max_mismatch and not self.note.startswith("!")

    def describe(self) -> str:
        if self.ok:
            return f"{self.name}: ok"
        if self.note.startswith("!"):
            return f"{self.name}: {self.note[1:]}"
        if self.tolerance == EXACT:
            return f"{self.name}: {self.bad} of {self.total} {self.unit} differ; {self.note}"
        return (f"{self.name}: {self.bad} of {self.total} {self.unit} outside atol={self.tolerance.atol:g} "
                f"rtol={self.tolerance.rtol:g} (max_abs {self.max_abs:.3g}, max_rel {self.max_rel:.3g}); "
                f"{self.note}")


def compare_tensors(name: str, got, want, tol: Tolerance) -> Diff:
    """Elementwise comparison; ``max_rel`` uses ``max(|want|, atol)`` as the denominator."""
    if not isinstance(got, torch.Tensor):
        return Diff(name, float("inf"), float("inf"), 1, 1, tol, f"!expected a tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        return Diff(name, float("inf"), float("inf"), max(want.numel(), 1), max(want.numel(), 1), tol,
                    f"!shape {list(got.shape)}, expected {list(want.shape)}")
    if got.dtype != want.dtype:
        return Diff(name, float("inf"), float("inf"), max(want.numel(), 1), max(want.numel(), 1), tol,
                    f"!dtype {got.dtype}, expected {want.dtype}")
    n = want.numel()
    if n == 0:
        return Diff(name, 0.0, 0.0, 0, 0, tol)
    if got.device != want.device:
        got = got.to(want.device)
    if not want.is_floating_point():
        ne = got != want
        bad = int(ne.sum())
        diff = (got.long() - want.long()).abs()
        note = ""
        if bad:
            i = int(ne.reshape(-1).nonzero()[0, 0])
            note = f"first at flat index {i}: {got.reshape(-1)[i].item()} vs {want.reshape(-1)[i].item()}"
        mx = float(diff.max())
        return Diff(name, mx, mx, bad, n, tol, note)
    g, w = got.double(), want.double()
    nan_g, nan_w = torch.isnan(g), torch.isnan(w)
    inf_mismatch = (torch.isinf(g) | torch.isinf(w)) & (g != w)
    finite = ~(nan_g | nan_w) & ~(torch.isinf(g) | torch.isinf(w))
    err = torch.where(finite, (g - w).abs(), torch.zeros_like(g))
    limit = tol.atol + tol.rtol * w.abs()
    bad_mask = (nan_g != nan_w) | inf_mismatch | (finite & (err > limit))
    bad = int(bad_mask.sum())
    max_abs = float(err.max())
    rel = err / torch.clamp(w.abs(), min=max(tol.atol, 1e-30))
    max_rel = float(torch.where(finite, rel, torch.zeros_like(rel)).max())
    note = ""
    if bad:
        i = int(bad_mask.reshape(-1).nonzero()[0, 0])
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), tuple(want.shape)))
        note = f"first at {list(idx)}: {g.reshape(-1)[i].item():.6g} vs {w.reshape(-1)[i].item():.6g}"
    return Diff(name, max_abs, max_rel, bad, n, tol, note)


def flatten_outputs(obj, prefix: str = "out"):
    """``[(name, tensor)]`` for a tensor, or a (nested) tuple/list/dict of them (None is skipped)."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [p for k in obj for p in flatten_outputs(obj[k], f"{prefix}.{k}")]
    if isinstance(obj, (tuple, list)):
        return [p for i, v in enumerate(obj) for p in flatten_outputs(v, f"{prefix}[{i}]")]
    return []
