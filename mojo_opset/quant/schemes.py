"""The quantization schemes of the quantized MoE (SPEC §3.6) and the constants of their formats."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_int, fail

EPS = 1e-12            # amax floor: an all-zero row/group gets scale EPS/qmax, quantizes to 0, never NaN
INT8_MAX = 127         # int8 weights and activations: symmetric, codes in [-127, 127]
INT4_MAX = 7           # int4 weights: scale amax/7; codes in [-7, 7] (the format also holds -8)
FP8_MAX = 448.0        # float8_e4m3fn's largest finite value
FP8_BLOCK = 128        # fp8 weight blocks are 128x128; fp8 activation groups are 128 columns
DEFAULT_INT4_GROUP = 128


def amax_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """``max(amax, 1e-12) / qmax``, correctly rounded on every device (CUDA would turn a division by a
    Python number into a multiplication by its rounded reciprocal, 1 ulp off on some values)."""
    return amax.clamp_min(EPS) / torch.full_like(amax, qmax)


@dataclass(frozen=True)
class Scheme:
    name: str
    weight: str                 # "int8" per output channel | "int4" packed, per group | "fp8_block" 128x128
    activation: str | None      # "int8" per token | "fp8" per token and 128 columns | None (weight-only)


SCHEMES = {s.name: s for s in (
    Scheme("w8a8_int8", "int8", "int8"),
    Scheme("w4a8_int4", "int4", "int8"),
    Scheme("w8a16_int8", "int8", None),
    Scheme("w4a16_int4", "int4", None),
    Scheme("w8a8_fp8_block", "fp8_block", "fp8"),
)}
QUANT_SCHEMES = tuple(SCHEMES)


def get_scheme(scheme) -> Scheme:
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        fail(f"scheme must be one of {', '.join(map(repr, QUANT_SCHEMES))}, got {scheme!r}")
    return SCHEMES[scheme]


def resolve_group_size(scheme: Scheme, group_size, hidden: int, inter: int) -> int | None:
    """The group size a scheme uses for w13 ``[E, 2I, H]`` and w2 ``[E, H, I]``, validated.

    int8: None (per output channel).  int4: default 128; K (H for w13, I for w2) must be even (two
    codes per byte) and divisible by the group.  fp8: 128, and I must be a multiple of 128 so that no
    block spans w13's gate and up halves."""
    name = scheme.name
    if scheme.weight == "int8":
        if group_size is not None:
            fail(f"group_size must be None for {name} (per-output-channel scales), got {group_size!r}")
        return None
    if scheme.weight == "fp8_block":
        if group_size is not None and (check_int("group_size", group_size) != FP8_BLOCK):
            fail(f"group_size must be None or {FP8_BLOCK} for {name} (128x128 blocks), got {group_size!r}")
        if inter % FP8_BLOCK:
            fail(f"{name} needs the expert intermediate size I to be a multiple of {FP8_BLOCK} "
                 f"(w13 is [E, 2I, H], w2 is [E, H, I]), got I = {inter}")
        return FP8_BLOCK
    g = DEFAULT_INT4_GROUP if group_size is None else check_int("group_size", group_size, lo=1)
    for what, k in (("H (the K of w13 [E, 2I, H])", hidden), ("I (the K of w2 [E, H, I])", inter)):
        if k % 2:
            fail(f"{name} packs two int4 codes per byte along K: {what} must be even, got {k}")
        if k % g:
            fail(f"group_size must divide {what} for {name}: {k} is not a multiple of {g}"
                 + ("" if group_size is not None else " (the default group_size); pass group_size="))
    return g
