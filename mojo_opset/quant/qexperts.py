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
    everything; see :meth:`from_tensors` to load a checkpoint's tensors and docs/quantization.md.

    ``w13_smooth`` ``[E, H]`` / ``w2_smooth`` ``[E, I]`` (optional, float32): per-expert activation
    smoothing multipliers -- each row routed to expert e is multiplied by ``w13_smooth[e]`` (in fp32)
    before w13's activation quantization (a16 schemes: before the GEMM, the product rounded to x's
    dtype), likewise the SwiGLU output by ``w2_smooth[e]`` before w2's (SmoothQuant checkpoints that
    store the inverse smoothing factor, e.g. the original mojo_opset's ``inv_smooth_scale``).  A kernel
    that does not implement them declines the call (the ``activation_smoothing`` option)."""

    scheme: str
    w13_q: torch.Tensor
    w13_scale: torch.Tensor
    w2_q: torch.Tensor
    w2_scale: torch.Tensor
    group_size: int | None = None
    w13_smooth: torch.Tensor | None = None
    w2_smooth: torch.Tensor | None = None

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
        for name, k in (("w13_smooth", H), ("w2_smooth", inter)):
            t = getattr(self, name)
            if t is not None:
                check_tensor(name, t, dtypes=(torch.float32,), shape=(E, k))
                if t.device != dev:
                    fail(f"{name} is on {t.device} but w13_q is on {dev}: "
                         "all tensors of a QuantizedExperts must be on one device")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_tensors(cls, scheme: str, w13_q, w13_scale, w2_q, w2_scale, group_size=None, *, w13_smooth=None,
                     w2_smooth=None) -> "QuantizedExperts":
        """Wrap a checkpoint's quantized tensors (see docs/quantization.md for conversions).

        Scales of any float dtype are converted to float32 (lossless from bf16/fp16) and must be
        finite and non-negative; smoothing multipliers likewise, and finite and positive; tensors are
        made contiguous."""
        smooth = {}
        for name, t in (("w13_smooth", w13_smooth), ("w2_smooth", w2_smooth)):
            if t is not None:
                check_tensor(name, t, dtypes=FLOAT_DTYPES)
                t = t.float().contiguous()
                if t.numel() and not bool((torch.isfinite(t) & (t > 0)).all()):
                    fail(f"{name} must hold finite, positive smoothing multipliers")
            smooth[name] = t
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
                   group_size, **smooth)

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

    def signature(self) -> tuple:
        """What a kernel's decision depends on (the dispatcher caches by it): scheme, sizes, dtypes,
        device and the options in use."""
        return (self.scheme, self.group_size, self.w13_shape, self.device.type, self.w13_q.dtype,
                self.w13_scale.dtype, tuple(sorted(self.options())))

    def options(self) -> dict:
        """Features of these weights beyond the scheme, as ``{name: value}`` options of the
        quantized-experts call; a kernel that does not declare one declines the call."""
        return {"activation_smoothing": True} if self.has_smoothing else {}

    @property
    def has_smoothing(self) -> bool:
        return self.w13_smooth is not None or self.w2_smooth is not None

    def nbytes(self) -> int:
        """Bytes held by codes, scales and smoothing multipliers."""
        return sum(t.numel() * t.element_size() for t in (self.w13_q, self.w13_scale, self.w2_q, self.w2_scale,
                                                           self.w13_smooth, self.w2_smooth) if t is not None)

    # ------------------------------------------------------------------ conversions

    def dequantize(self, dtype: torch.dtype = torch.float32):
        """``(w13 [E, 2I, H], w2 [E, H, I])`` = code x scale in float32 (times the smoothing multiplier
        of each input column, if any: the float weights these stand for), then cast to ``dtype``."""
        if dtype not in FLOAT_DTYPES:
            fail(f"dtype must be one of float32, float16, bfloat16, got {dtype}", TypeError)
        fmt = self.info.weight
        out = []
        for q, s, sm in ((self.w13_q, self.w13_scale, self.w13_smooth), (self.w2_q, self.w2_scale, self.w2_smooth)):
            w = dequantize_weight(fmt, q, s, self.group_size)
            out.append((w if sm is None else w * sm.unsqueeze(1)).to(dtype))
        return tuple(out)

    def expert_weights(self, e: int):
        """Codes and scales of expert ``e``: ``(w13_q, w13_scale, w2_q, w2_scale)``."""
        return self.w13_q[e], self.w13_scale[e], self.w2_q[e], self.w2_scale[e]

    def expert_smoothing(self, e: int):
        """Smoothing multipliers of expert ``e``: ``(w13_smooth [H] or None, w2_smooth [I] or None)``."""
        return tuple(None if t is None else t[e] for t in (self.w13_smooth, self.w2_smooth))

    def to(self, device, non_blocking: bool = False) -> "QuantizedExperts":
        """A copy on ``device`` (codes and scales keep their dtypes)."""
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QuantizedExperts(self.scheme, mv(self.w13_q), mv(self.w13_scale), mv(self.w2_q),
                                mv(self.w2_scale), self.group_size, mv(self.w13_smooth), mv(self.w2_smooth))

    def slice_experts(self, start: int, stop: int) -> "QuantizedExperts":
        """Experts ``[start, stop)`` (views), e.g. a rank's slice for expert parallelism."""
        E = self.num_experts
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= E):
            fail(f"slice_experts needs 0 <= start <= stop <= {E}, got ({start!r}, {stop!r})")
        sl = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return QuantizedExperts(self.scheme, self.w13_q[start:stop], self.w13_scale[start:stop],
                                self.w2_q[start:stop], self.w2_scale[start:stop], self.group_size,
                                sl(self.w13_smooth), sl(self.w2_smooth))

    def __repr__(self) -> str:
        E, N, H = self.w13_shape
        return (f"QuantizedExperts(scheme={self.scheme!r}, E={E}, I={N // 2}, H={H}, "
                f"group_size={self.group_size}, device={self.device}, "
                + ("activation_smoothing=True, " if self.has_smoothing else "") +
                f"codes={_dt(self.w13_q.dtype)}, bytes={self.nbytes()})")


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor, scheme: str, group_size=None) -> QuantizedExperts:
    """Quantize float expert weights ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` with ``scheme``
    (one of ``QUANT_SCHEMES``); w13's gate and up halves are quantized as one matrix of N = 2I rows."""
    info = get_scheme(scheme)
    check_tensor("w13", w13, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("w2", w2, ndim=3, dtypes=FLOAT_DTYPES, device=None)
    if w2.device != w13.device:
        fail(f"w2 is on {w2.device} but w13 is on {w13.device}: both must be on one device")
    if w13.device.type == "meta":
        # quantization reads the values (ranges, scales): a meta tensor has none
        fail("w13 and w2 are on the meta device: quantize_experts needs their values; materialise the "
             "weights first (e.g. module.to_empty(device=...) and load a checkpoint)")
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
