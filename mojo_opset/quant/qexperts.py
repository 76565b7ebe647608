"""Quantized expert weights: the container, its validation, and quantization from float weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import FLOAT_DTYPES, check_tensor, fail
from .schemes import FP8_BLOCK, Scheme, get_scheme, resolve_group_size
from .weights import dequantize_weight, quantize_weight

_CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "fp8_block": torch.float8_e4m3fn}


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _scale_shape(fmt: str, E: int, N: int, K: int, group: int | None) -> tuple:
    if fmt == "int8":
        return (E, N)
    if fmt == "int4":
        return (E, N, K // group)
    return (E, -(-N // FP8_BLOCK), -(-K // FP8_BLOCK))


@dataclass(frozen=True, eq=False)
class QuantizedExperts:
    """Quantized ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` of one MoE layer (or of a rank's expert slice).

    ``w13_q`` / ``w2_q``: codes -- int8 ``[E, N, K]`` (``*_int8`` schemes), uint8 ``[E, N, K/2]`` packed
    int4 (``*_int4``), float8_e4m3fn ``[E, N, K]`` (``w8a8_fp8_block``); ``w13_scale`` / ``w2_scale``:
    float32 multipliers -- ``[E, N]``, ``[E, N, K/group_size]``, ``[E, ceil(N/128), ceil(K/128)]``.
    ``group_size``: the int4 group (default 128), 128 for fp8, None for int8.  The constructor validates
    everything; see :meth:`from_tensors` to load a checkpoint's tensors and docs/quantization.md."""

    scheme: str
    w13_q: torch.Tensor
    w13_scale: torch.Tensor
    w2_q: torch.Tensor
    w2_scale: torch.Tensor
    group_size: int | None = None

    def __post_init__(self):
        info = get_scheme(self.scheme)
        code = _CODE_DTYPES[info.weight]
        for name in ("w13_q", "w2_q"):
            check_tensor(name, getattr(self, name), ndim=3, dtypes=(code,))
        for name in ("w13_scale", "w2_scale"):
            check_tensor(name, getattr(self, name), dtypes=(torch.float32,))
        dev = self.w13_q.device
        for name in ("w13_scale", "w2_q", "w2_scale"):
            if getattr(self, name).device != dev:
                fail(f"{name} is on {getattr(self, name).device} but w13_q is on {dev}: "
                     "all tensors of a QuantizedExperts must be on one device")
        pack = 2 if info.weight == "int4" else 1
        E, N, H = self.w13_q.shape
        H *= pack
        if N % 2:
            fail(f"w13_q must have an even number of rows N = 2I (gate rows then up rows), got shape "
                 f"{list(self.w13_q.shape)}")
        inter = N // 2
        if inter % pack:
            fail(f"{self.scheme} packs two int4 codes per byte along K: I (w13_q has N = 2I = {N} rows) "
                 f"must be even, got {inter}")
        if tuple(self.w2_q.shape) != (E, H, inter // pack):
            what = f"[E, H, I] = [{E}, {H}, {inter}]" + (" with I packed to I/2" if pack == 2 else "")
            fail(f"w2_q must have shape {what} to match w13_q {list(self.w13_q.shape)}, "
                 f"got {list(self.w2_q.shape)}")
        g = resolve_group_size(info, self.group_size, H, inter)
        object.__setattr__(self, "group_size", g)
        for name, n, k in (("w13_scale", N, H), ("w2_scale", H, inter)):
            want = _scale_shape(info.weight, E, n, k, g)
            got = tuple(getattr(self, name).shape)
            if got != want:
                hint = ""
                if info.weight == "int4" and len(got) == 3 and got[-1] and k % got[-1] == 0:
                    hint = f" (a scale shape {list(got)} means group_size={k // got[-1]})"
                fail(f"{name} must have shape {list(want)} for {self.scheme} with group_size={g}, "
                     f"got {list(got)}{hint}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_tensors(cls, scheme: str, w13_q, w13_scale, w2_q, w2_scale, group_size=None) -> "QuantizedExperts":
        """Wrap a checkpoint's quantized tensors (see docs/quantization.md for conversions).

        Scales of any float dtype are converted to float32 (lossless from bf16/fp16) and must be
        finite and non-negative; tensors are made contiguous."""
        scales = {}
        for name, s in (("w13_scale", w13_scale), ("w2_scale", w2_scale)):
            check_tensor(name, s, dtypes=FLOAT_DTYPES)
            s = s.float().contiguous()
            if s.numel() and not bool((torch.isfinite(s) & (s >= 0)).all()):
                fail(f"{name} must hold finite, non-negative scales")
            scales[name] = s
        for name, t in (("w13_q", w13_q), ("w2_q", w2_q)):
            check_tensor(name, t)
        return cls(scheme, w13_q.contiguous(), scales["w13_scale"], w2_q.contiguous(), scales["w2_scale"],
                   group_size)

    # ------------------------------------------------------------------ properties

    @property
    def info(self) -> Scheme:
        return get_scheme(self.scheme)

    @property
    def num_experts(self) -> int:
        return self.w13_q.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.w13_q.shape[1] // 2

    @property
    def hidden_size(self) -> int:
        return self.w2_q.shape[1]

    @property
    def w13_shape(self) -> tuple:
        """The logical (dequantized) shape ``(E, 2I, H)``."""
        return (self.num_experts, 2 * self.intermediate_size, self.hidden_size)

    @property
    def w2_shape(self) -> tuple:
        """The logical (dequantized) shape ``(E, H, I)``."""
        return (self.num_experts, self.hidden_size, self.intermediate_size)

    @property
    def device(self) -> torch.device:
        return self.w13_q.device

    def nbytes(self) -> int:
        """Bytes held by codes and scales."""
        return sum(t.numel() * t.element_size() for t in (self.w13_q, self.w13_scale, self.w2_q, self.w2_scale))

    # ------------------------------------------------------------------ conversions

    def dequantize(self, dtype: torch.dtype = torch.float32):
        """``(w13 [E, 2I, H], w2 [E, H, I])`` = code x scale in float32, then cast to ``dtype``."""
        if dtype not in FLOAT_DTYPES:
            fail(f"dtype must be one of float32, float16, bfloat16, got {dtype}", TypeError)
        fmt = self.info.weight
        return (dequantize_weight(fmt, self.w13_q, self.w13_scale, self.group_size).to(dtype),
                dequantize_weight(fmt, self.w2_q, self.w2_scale, self.group_size).to(dtype))

    def expert_weights(self, e: int):
        """Codes and scales of expert ``e``: ``(w13_q, w13_scale, w2_q, w2_scale)``."""
        return self.w13_q[e], self.w13_scale[e], self.w2_q[e], self.w2_scale[e]

    def to(self, device, non_blocking: bool = False) -> "QuantizedExperts":
        """A copy on ``device`` (codes and scales keep their dtypes)."""
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QuantizedExperts(self.scheme, mv(self.w13_q), mv(self.w13_scale), mv(self.w2_q),
                                mv(self.w2_scale), self.group_size)

    def slice_experts(self, start: int, stop: int) -> "QuantizedExperts":
        """Experts ``[start, stop)`` (views), e.g. a rank's slice for expert parallelism."""
        E = self.num_experts
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= E):
            fail(f"slice_experts needs 0 <= start <= stop <= {E}, got ({start!r}, {stop!r})")
        return QuantizedExperts(self.scheme, self.w13_q[start:stop], self.w13_scale[start:stop],
                                self.w2_q[start:stop], self.w2_scale[start:stop], self.group_size)

    def __repr__(self) -> str:
        E, N, H = self.w13_shape
        return (f"QuantizedExperts(scheme={self.scheme!r}, E={E}, I={N // 2}, H={H}, "
                f"group_size={self.group_size}, device={self.device}, "
                f"codes={_dt(self.w13_q.dtype)}, bytes={self.nbytes()})")


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor, scheme: str, group_size=None) -> QuantizedExperts:
    """Quantize float expert weights ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` with ``scheme``
    (one of ``QUANT_SCHEMES``); w13's gate and up halves are quantized as one matrix of N = 2I rows."""
    info = get_scheme(scheme)
    check_tensor("w13", w13, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("w2", w2, ndim=3, dtypes=FLOAT_DTYPES, device=None)
    if w2.device != w13.device:
        fail(f"w2 is on {w2.device} but w13 is on {w13.device}: both must be on one device")
    E, N, H = w13.shape
    if N % 2:
        fail(f"w13 must have shape [E, 2I, H] (an even number of rows), got {list(w13.shape)}")
    if tuple(w2.shape) != (E, H, N // 2):
        fail(f"w2 must have shape [E, H, I] = [{E}, {H}, {N // 2}] to match w13 {list(w13.shape)}, "
             f"got {list(w2.shape)}")
    if E < 1 or N < 1 or H < 1:
        fail(f"w13 must have non-empty dimensions, got shape {list(w13.shape)}")
    g = resolve_group_size(info, group_size, H, N // 2)
    for name, w in (("w13", w13), ("w2", w2)):
        if not bool(torch.isfinite(w).all()):
            fail(f"{name} holds NaN or Inf values; they cannot be quantized")
    q13, s13 = quantize_weight(info.weight, w13, g)
    q2, s2 = quantize_weight(info.weight, w2, g)
    return QuantizedExperts(scheme, q13, s13, q2, s2, g)
