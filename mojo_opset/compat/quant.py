"""The original's quantized experts: its weight layout converted to :class:`mojo_opset.QuantizedExperts`,
and ``MojoQuantExperts``, a thin layer over :func:`mojo_opset.moe_quant_experts`.

The original's format (``MojoQuantExperts`` with ``quant_dtype=torch.int8``: int8 activations,
quantized per token):

* ``up_proj_weight`` ``[E, 2I, H]`` int8, or with ``up_weight_dtype="int4"`` ``[E, I, H]``: signed int4
  codes packed two per byte along the *output* dimension (row 2i in the low nibble, row 2i+1 in the
  high one); ``down_proj_weight`` likewise ``[E, H, I]`` / ``[E, H/2, I]``.
* ``*_weight_scale`` bfloat16 multipliers: ``[E, N]`` per output channel (``*_quant_group_size <= 0``)
  or ``[E, N, ceil(K/g)]`` per group of g input columns (the last group may be shorter).
* ``up_proj_quantize.inv_smooth_scale`` ``[E, H]`` and ``down_proj_quantize.inv_smooth_scale`` ``[E, I]``
  float32: multiplied into each expert's input rows before they are quantized.

:func:`convert_quant_experts` maps this exactly onto this library's schemes: codes are repacked
two per byte along K; a per-channel scale, or a group that ends where a smaller group ends, is the
same multiplier repeated, so both matrices get the largest common group that splits every original
group (int4 -> ``w4a8_int4``); int8 weights with per-channel scales -> ``w8a8_int8`` (an int4
matrix with per-channel scales next to an int8 one is stored as int8 codes, its values unchanged);
the smoothing factors become ``w13_smooth`` / ``w2_smooth`` (dropped when exactly 1, which changes
nothing).  int8 weights with group scales, and grouped int4 next to int8, have no scheme here: a
NotImplementedError says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..functional import moe_quant_experts
from ..quant import QuantizedExperts, pack_int4, unpack_int4
from .experts import check_activation, group_ends
from .operator import MojoOperator, check_size

__all__ = ["MojoQuantExperts", "convert_quant_experts", "QuantLayout", "quant_layout"]


def _weight_format(name: str, value) -> str:
    if isinstance(value, str) and value == "int4":
        return "int4"
    if value is torch.int8:
        return "int8"
    raise ValueError(f"{name} must be 'int4' or torch.int8, got {value!r}")


def _group(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (<= 0: per output channel), got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class QuantLayout:
    """How an original configuration maps onto a scheme here (see the module docstring)."""
    scheme: str
    group_size: int | None
    hidden_size: int
    intermediate_size: int
    up_format: str
    down_format: str
    up_group: int                # the original's group sizes (<= 0: per channel)
    down_group: int

    def scale_shape(self, which: str, num_experts: int) -> tuple:
        """The original's scale shape for ``"up"`` or ``"down"``."""
        n, k, g = ((2 * self.intermediate_size, self.hidden_size, self.up_group) if which == "up"
                   else (self.hidden_size, self.intermediate_size, self.down_group))
        return (num_experts, n) if g <= 0 else (num_experts, n, -(-k // g))

    def code_shape(self, which: str, num_experts: int) -> tuple:
        """The original's code shape for ``"up"`` or ``"down"`` (int4: halved output dimension)."""
        n, k, fmt = ((2 * self.intermediate_size, self.hidden_size, self.up_format) if which == "up"
                     else (self.hidden_size, self.intermediate_size, self.down_format))
        return (num_experts, n // 2 if fmt == "int4" else n, k)


def _span(group: int, k: int) -> int:
    """The longest run of columns that one scale covers inside every original group of ``group``
    columns (k for per-channel scales or a single group)."""
    return k if group <= 0 or group >= k else math.gcd(group, k)


def quant_layout(hidden_size: int, intermediate_size: int, *, up_weight_dtype=torch.int8, down_weight_dtype=torch.int8,
                 up_quant_group_size: int = -1, down_quant_group_size: int = -1) -> QuantLayout:
    """The scheme and group size that hold an original configuration exactly, or NotImplementedError."""
    H, I = check_size("hidden_size", hidden_size), check_size("intermediate_size", intermediate_size)
    up = _weight_format("up_weight_dtype", up_weight_dtype)
    down = _weight_format("down_weight_dtype", down_weight_dtype)
    gu, gd = _group("up_quant_group_size", up_quant_group_size), _group("down_quant_group_size", down_quant_group_size)
    if "int4" in (up, down) and (H % 2 or I % 2):
        raise ValueError(f"int4 weights need an even hidden_size and intermediate_size (two codes per byte), "
                         f"got {H} and {I}")
    per_channel = {"up": _span(gu, H) == H, "down": _span(gd, I) == I}
    if up == down == "int4":
        g = math.gcd(_span(gu, H), _span(gd, I))
        return QuantLayout("w4a8_int4", g, H, I, up, down, gu, gd)
    if all(per_channel.values()):
        return QuantLayout("w8a8_int8", None, H, I, up, down, gu, gd)
    grouped = [w for w in ("up", "down") if not per_channel[w]]
    what = {"up": (up, gu), "down": (down, gd)}
    detail = "; ".join(f"{w}_weight_dtype={'int4' if what[w][0] == 'int4' else 'torch.int8'} with "
                       f"{w}_quant_group_size={what[w][1]}" for w in grouped)
    raise NotImplementedError(
        f"this configuration has no quantization scheme in mojo_opset ({detail}, the other projection "
        f"{'int8' if 'int8' in (up, down) else 'int4'}): group scales are supported for int4 weights in both "
        "projections; int8 weights need per-channel scales (quant_group_size <= 0)")


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """The original's int4 codes packed along the output dimension ``[E, N/2, K]`` -> int8 ``[E, N, K]``."""
    # the same nibble order as this library's packing along K, so unpack the transpose
    return unpack_int4(packed.view(torch.uint8).transpose(-1, -2)).transpose(-1, -2)


def _expand_scales(scale: torch.Tensor, group: int, k: int, new_group: int) -> torch.Tensor:
    """Scales of the original's groups (or per channel) -> one per ``new_group`` columns (the same
    multiplier repeated for every part of an original group)."""
    if scale.dim() == 2:
        scale = scale.unsqueeze(-1)
    first_col = torch.arange(0, k, new_group, device=scale.device)
    src = first_col // group if scale.shape[-1] > 1 else torch.zeros_like(first_col)
    return scale[..., src]


def _check_tensor(name: str, t, shape: tuple, dtypes: tuple):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d).replace('torch.', '') for d in dtypes]}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _smoothing(name: str, t, shape: tuple):
    if t is None:
        return None
    _check_tensor(name, t, shape, (torch.float32, torch.bfloat16, torch.float16))
    return None if bool((t == 1).all()) else t     # exactly 1 changes nothing: keep the kernels' fast path


def convert_quant_experts(up_proj_weight, up_proj_weight_scale, down_proj_weight, down_proj_weight_scale, *,
                          up_weight_dtype=torch.int8, down_weight_dtype=torch.int8, up_quant_group_size: int = -1,
                          down_quant_group_size: int = -1, up_inv_smooth_scale=None,
                          down_inv_smooth_scale=None) -> QuantizedExperts:
    """The original mojo_opset's quantized expert tensors as a :class:`mojo_opset.QuantizedExperts`.

    Arguments are the original's ``MojoQuantExperts`` tensors and settings (module docstring); the
    conversion is exact (same codes, same multipliers).  ``*_inv_smooth_scale`` (the
    ``up_proj_quantize`` / ``down_proj_quantize`` parameters) become the activation smoothing
    multipliers.  Raises NotImplementedError for a configuration no scheme here holds."""
    for name, t in (("up_proj_weight", up_proj_weight), ("down_proj_weight", down_proj_weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [num_experts, out, in], got "
                             f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    up_fmt = _weight_format("up_weight_dtype", up_weight_dtype)
    E, n_up, H = up_proj_weight.shape
    I = n_up if up_fmt == "int4" else n_up // 2       # int4: [E, 2I/2, H]
    layout = quant_layout(H, I, up_weight_dtype=up_weight_dtype, down_weight_dtype=down_weight_dtype,
                          up_quant_group_size=up_quant_group_size, down_quant_group_size=down_quant_group_size)
    codes = {}
    for which, w in (("up", up_proj_weight), ("down", down_proj_weight)):
        fmt = layout.up_format if which == "up" else layout.down_format
        _check_tensor(f"{which}_proj_weight", w, layout.code_shape(which, E), (torch.int8, torch.uint8))
        codes[which] = _unpack_rows(w) if fmt == "int4" else w.view(torch.int8)
    scales = {}
    for which, s in (("up", up_proj_weight_scale), ("down", down_proj_weight_scale)):
        _check_tensor(f"{which}_proj_weight_scale", s, layout.scale_shape(which, E),
                      (torch.bfloat16, torch.float16, torch.float32))
        scales[which] = s.detach()
    smooth13 = _smoothing("up_inv_smooth_scale", up_inv_smooth_scale, (E, H))
    smooth2 = _smoothing("down_inv_smooth_scale", down_inv_smooth_scale, (E, I))
    g = layout.group_size
    if layout.scheme == "w4a8_int4":
        w13_q, w2_q = pack_int4(codes["up"]), pack_int4(codes["down"])
        s13 = _expand_scales(scales["up"], layout.up_group, H, g)
        s2 = _expand_scales(scales["down"], layout.down_group, I, g)
    else:                                           # per-channel int8 (int4 codes are int8 values too)
        w13_q, w2_q = codes["up"].contiguous(), codes["down"].contiguous()
        s13, s2 = (scales[w].reshape(E, -1) for w in ("up", "down"))    # a single group is per channel
    return QuantizedExperts.from_tensors(
        layout.scheme, w13_q, s13, w2_q, s2, g,
        w13_smooth=None if smooth13 is None else smooth13.detach(),
        w2_smooth=None if smooth2 is None else smooth2.detach())


class SmoothingScales(nn.Module):
    """Holds the ``inv_smooth_scale [E, K]`` of the original's ``MojoMoEDynamicQuant`` (its state-dict
    entry); the per-token quantization itself runs inside the quantized experts here."""

    def __init__(self, num_experts: int, input_size: int, device=None):
        super().__init__()
        self.inv_smooth_scale = nn.Parameter(torch.ones(num_experts, input_size, dtype=torch.float32, device=device))
        self.inv_smooth_scale.force_dtype = torch.float32

    def extra_repr(self) -> str:
        E, K = self.inv_smooth_scale.shape
        return f"expert_num={E}, input_size={K}"


class MojoQuantExperts(MojoOperator, core=True):
    """``forward(sorted_hidden_states [R, H], tokens_per_expert [E])`` -> ``[R, H]``, with the
    original's quantized weights (module docstring) converted once per change of their values."""

    _op = "moe_quant_experts"

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "swiglu",
                 quant_dtype: torch.dtype = torch.int8, up_quant_group_size: int = -1,
                 up_weight_dtype=torch.int8, down_quant_group_size: int = -1, down_weight_dtype=torch.int8,
                 **kwargs):
        super().__init__(**kwargs)
        check_activation(activation, "MojoQuantExperts")
        if quant_dtype is not torch.int8:
            raise ValueError(f"MojoQuantExperts: quant_dtype must be torch.int8 (int8 activations), got {quant_dtype}")
        E = check_size("num_experts", num_experts, lo=0)
        self.layout = quant_layout(hidden_size, intermediate_size, up_weight_dtype=up_weight_dtype,
                                   down_weight_dtype=down_weight_dtype, up_quant_group_size=up_quant_group_size,
                                   down_quant_group_size=down_quant_group_size)
        self.activation, self.quant_dtype = activation, quant_dtype
        self.num_experts, self.hidden_size, self.intermediate_size = E, hidden_size, intermediate_size
        self.up_quant_group_size, self.up_weight_dtype = up_quant_group_size, up_weight_dtype
        self.down_quant_group_size, self.down_weight_dtype = down_quant_group_size, down_weight_dtype
        dev = self.tensor_factory_kwargs.get("device")
        # parameters start at zero codes, unit scales and unit smoothing (the original left them uninitialised)
        for which in ("up", "down"):
            self.register_buffer(f"{which}_proj_weight",
                                 torch.zeros(self.layout.code_shape(which, E), dtype=torch.int8, device=dev))
            scale = nn.Parameter(torch.ones(self.layout.scale_shape(which, E), dtype=torch.bfloat16, device=dev))
            scale.force_dtype = torch.bfloat16
            setattr(self, f"{which}_proj_weight_scale", scale)
        self.up_proj_quantize = SmoothingScales(E, hidden_size, dev)
        self.down_proj_quantize = SmoothingScales(E, intermediate_size, dev)
        self._converted: tuple | None = None

    def _sources(self):
        return (self.up_proj_weight, self.up_proj_weight_scale, self.down_proj_weight, self.down_proj_weight_scale,
                self.up_proj_quantize.inv_smooth_scale, self.down_proj_quantize.inv_smooth_scale)

    def quantized_experts(self) -> QuantizedExperts:
        """The weights as a :class:`mojo_opset.QuantizedExperts` (cached until a tensor changes:
        loading a state dict, moving the module or writing into a tensor in place)."""
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in self._sources())
        if self._converted is None or self._converted[0] != key:
            with torch.no_grad():
                q = convert_quant_experts(
                    self.up_proj_weight, self.up_proj_weight_scale, self.down_proj_weight,
                    self.down_proj_weight_scale, up_weight_dtype=self.up_weight_dtype,
                    down_weight_dtype=self.down_weight_dtype, up_quant_group_size=self.up_quant_group_size,
                    down_quant_group_size=self.down_quant_group_size,
                    up_inv_smooth_scale=self.up_proj_quantize.inv_smooth_scale,
                    down_inv_smooth_scale=self.down_proj_quantize.inv_smooth_scale)
            self._converted = (key, q)
        return self._converted[1]

    def forward(self, sorted_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        ends = group_ends(tokens_per_expert, self.num_experts, sorted_hidden_states.device)
        return moe_quant_experts(sorted_hidden_states, ends, self.quantized_experts(), activation=self.activation,
                                    backend=self._backend)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, intermediate_size={self.intermediate_size}, "
                f"hidden_size={self.hidden_size}, quant_dtype={self.quant_dtype}, "
                f"up_quant_group_size={self.up_quant_group_size}, up_weight_dtype={self.up_weight_dtype}, "
                f"down_quant_group_size={self.down_quant_group_size}, down_weight_dtype={self.down_weight_dtype}")
