"""The typed op contract: one frozen call object per op, built by the core from a validated,
normalised public call, and the only thing a backend's :class:`~mojo_opset.backend.OpImpl` receives.

Fields marked with :func:`option` are *options*: features with a default that a backend implements
or not.  ``deterministic`` (set by :func:`mojo_opset.deterministic`) is one: an implementation that
declares it returns, for each token, bits that do not depend on the token count or on the other
tokens of the call, and the same bits run to run.  Permute has no such field: it only moves rows.  :meth:`Call.active_options` names the options a call uses with a non-default value; an
implementation that did not declare one of them declines the call with a reason (so an option added
here later is declined by every backend until it says it implements it, never ignored).

:meth:`Call.signature` is what the dispatcher caches decisions by: the op, the data tensor's device
(the core puts every tensor of a call on it), every tensor's dtype, shape, contiguity and
``requires_grad``, and every other field's value.  Reasons must be a pure function
of it (and of the implementation's ``state_key()``).
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from .names import (MOE_COMBINE, MOE_EXPERTS, MOE_FORWARD, MOE_GATING, MOE_PERMUTE, MOE_QUANT_EXPERTS,
                    QUANT_MOE_FORWARD)

__all__ = ["option", "Call", "RoutingOptions", "GatingCall", "PermuteCall", "ExpertsCall", "QuantExpertsCall",
           "CombineCall", "ForwardCall", "QuantForwardCall", "CALL_TYPES"]


def option(default: Any) -> Any:
    """A dataclass field that is an option: a backend must declare it to serve non-default values."""
    return field(default=default, metadata={"option": True})


_PLAIN = frozenset((int, float, str, bool, type(None)))


def _spec(v: Any) -> Any:
    """A signature part for a field that is neither a tensor nor a plain value."""
    if hasattr(v, "signature"):          # RoutingOptions, QuantizedExperts
        return v.signature()
    return v


def _is_default(value: Any, default: Any) -> bool:
    if default is None:
        return value is None
    if isinstance(value, Tensor):
        return False
    return value == default


_META: dict[type, tuple] = {}      # filled at import for the contract's classes (torch.compile-friendly)


def _compute_meta(cls) -> tuple:
    fs = dataclasses.fields(cls)
    names = tuple(f.name for f in fs)
    options = tuple((f.name, f.default) for f in fs if f.metadata.get("option"))
    getter = operator.attrgetter(*names) if len(names) > 1 else lambda o: tuple(getattr(o, n) for n in names)
    return names, getter, options


class _Fields:
    """Per-class field names, getters and option defaults, computed once (dataclasses.fields is slow
    and the dispatcher builds a signature on every call)."""

    @classmethod
    def _meta(cls) -> tuple:
        meta = _META.get(cls)
        if meta is None:      # a class defined after import (e.g. a test-only subclass)
            meta = _META[cls] = _compute_meta(cls)
        return meta

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return cls._meta()[0]

    def _values(self) -> tuple:
        # plain getattr (not operator.attrgetter): torch.compile traces this when deciding in a graph
        return tuple([getattr(self, n) for n in self._meta()[0]])

    def active_options(self) -> dict[str, Any]:
        """``{option name: value}`` for every option this call uses with a non-default value."""
        out = {}
        for name, default in self._meta()[2]:
            v = getattr(self, name)
            if not _is_default(v, default):
                out[name] = v
        return out

    data: ClassVar[str] = ""      # a Call's data tensor field (its device stands for every tensor's)

    def signature(self) -> tuple:
        """The class, the data tensor's device (the core puts every tensor of a call on it), then
        per field: a tensor's dtype, shape, contiguity and ``requires_grad``, or the value's spec.
        Runs on every dispatched call: the tensor spec is inlined."""
        out = [type(self), getattr(self, self.data).device] if self.data else [type(self)]
        append = out.append
        for v in self._meta()[1](self):     # every field's value in one call (never traced by torch.compile)
            t = type(v)
            # plain tensors first (most fields, and the cheapest test), then plain values, then
            # tensor subclasses (nn.Parameter) and nested specs
            if t is Tensor or (t not in _PLAIN and isinstance(v, Tensor)):
                append((v.dtype, v.shape, v.is_contiguous(), v.requires_grad))
            elif t in _PLAIN:
                append(v)
            else:
                append(_spec(v))
        return tuple(out)


@dataclass(frozen=True, eq=False)
class RoutingOptions(_Fields):
    """SPEC §3.1 steps 2-7, validated: the arguments of the gating op besides the logits.

    ``num_limited_groups`` is normalised: group limiting is off exactly when ``num_expert_groups == 1``
    (keeping every group is no limit).  ``forced_expert_ids`` is int64 on the logits' device with
    values in ``[0, E)`` or -1; ``partial_replay`` is True when it may hold -1 (a slot that keeps the
    natural choice)."""

    top_k: int
    score_func: str = option("softmax")
    route_norm: bool = option(False)
    route_scale: float = option(1.0)
    expert_bias: Optional[Tensor] = option(None)
    num_expert_groups: int = option(1)
    num_limited_groups: int = 1
    group_score: str = option("top2_sum")
    forced_expert_ids: Optional[Tensor] = option(None)
    partial_replay: bool = option(False)

    def active_options(self) -> dict[str, Any]:
        out = super().active_options()
        if self.num_expert_groups == 1:
            out.pop("group_score", None)   # meaningless without group limiting
        return out

    @property
    def group_limited(self) -> bool:
        return self.num_expert_groups > 1


class Call(_Fields):
    """Base of the per-op call objects.  ``op`` names the op; ``data`` names the field whose tensor
    fixes the call's device and dtype; ``sizes()`` gives the named sizes that limits refer to."""

    op: ClassVar[str] = ""
    data: ClassVar[str] = ""

    @property
    def tensor(self) -> Tensor:
        return getattr(self, self.data)

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def sizes(self) -> dict[str, int]:
        return {}

    def tensors(self) -> list:
        """Every tensor the call carries (for autograd checks)."""
        out = []
        for v in self._values():
            if isinstance(v, Tensor):
                out.append(v)
            elif isinstance(v, RoutingOptions):
                out.extend(t for t in v._values() if isinstance(t, Tensor))
        return out

    def needs_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        return any(t.requires_grad for t in self.tensors())

    def active_options(self) -> dict[str, Any]:
        out = super().active_options()
        for v in self._values():
            if isinstance(v, RoutingOptions):
                out.update(v.active_options())
        return out


@dataclass(frozen=True, eq=False)
class GatingCall(Call):
    """logits ``[T, E]`` (fp32 when router_dtype is fp32, else the input dtype).

    Returns ``(topk_ids int32 [T, K], topk_weights fp32 [T, K], scores fp32 [T, E])``.  Backends need
    not be differentiable: when logits require grad the core takes the gradient from the reference
    formulas while keeping the kernel's values."""

    op: ClassVar[str] = MOE_GATING
    data: ClassVar[str] = "logits"
    logits: Tensor
    routing: RoutingOptions
    deterministic: bool = option(False)

    def sizes(self):
        T, E = self.logits.shape
        return {"tokens": T, "num_experts": E, "top_k": self.routing.top_k}


@dataclass(frozen=True, eq=False)
class PermuteCall(Call):
    """x ``[T, H]``, topk_ids int32 ``[T, K]`` with values in ``[0, num_experts)``.

    Returns ``(permuted_x [R, H], tokens_per_expert int32 [E], group_ends int32 [E], row_src int32
    [R], pair_row int32 [T*K])`` where R = T*K when align == 1, else T*K + E*(align-1) (the worst
    case: no host sync).  Rows are ordered by expert, stable in the pair index p = t*K + j; expert
    e's rows start at group_ends[e-1] (0 for e=0), its group padded with zero rows to a multiple of
    align; group_ends is the inclusive cumulative sum of padded counts (``torch._grouped_mm``'s
    ``offs``).  row_src[r] = p for a real row, -1 for padding and rows past group_ends[-1];
    pair_row[p] = the permuted row of pair p."""

    op: ClassVar[str] = MOE_PERMUTE
    data: ClassVar[str] = "x"
    x: Tensor
    topk_ids: Tensor
    num_experts: int
    align: int = option(1)

    def sizes(self):
        T, K = self.topk_ids.shape
        return {"tokens": T, "top_k": K, "num_experts": self.num_experts, "hidden_size": self.x.shape[1]}


def _weight_sizes(w13: Tensor) -> dict[str, int]:
    """Expert count and feature sizes of float experts from w13 ``[E, 2I, H]``."""
    E, N, H = w13.shape
    return {"num_experts": E, "hidden_size": H, "intermediate_size": N // 2}


@dataclass(frozen=True, eq=False)
class ExpertsCall(Call):
    """SwiGLU experts over expert-sorted rows: permuted_x ``[R, H]``, group_ends int32 ``[E]``,
    w13 ``[E, 2I, H]``, w2 ``[E, H, I]``.  Returns y ``[R, H]`` in permuted_x's dtype; rows past
    group_ends[-1] are zero."""

    op: ClassVar[str] = MOE_EXPERTS
    data: ClassVar[str] = "permuted_x"
    permuted_x: Tensor
    group_ends: Tensor
    w13: Tensor
    w2: Tensor
    activation: str = option("swiglu")
    deterministic: bool = option(False)

    def sizes(self):
        return {"rows": self.permuted_x.shape[0], **_weight_sizes(self.w13)}


class _QuantizedCall(Call):
    """The quantized calls: ``scheme`` is ``qexperts.scheme``; features of the weights beyond the
    scheme (``qexperts.options()``) are options of the call."""

    @property
    def scheme(self) -> str:
        return self.qexperts.scheme

    def active_options(self):
        out = super().active_options()
        opts = getattr(self.qexperts, "options", None)
        out.update(opts() if callable(opts) else {})
        return out

    def _expert_sizes(self) -> dict[str, int]:
        q = self.qexperts
        return {"num_experts": q.num_experts, "hidden_size": q.hidden_size, "intermediate_size": q.intermediate_size}


@dataclass(frozen=True, eq=False)
class QuantExpertsCall(_QuantizedCall):
    """Quantized SwiGLU experts over expert-sorted rows (as :class:`ExpertsCall`, with the experts
    given as a :class:`mojo_opset.QuantizedExperts`).  ``scheme`` is ``qexperts.scheme``; features of
    the quantized weights beyond the scheme appear as options through ``qexperts.options()``."""

    op: ClassVar[str] = MOE_QUANT_EXPERTS
    data: ClassVar[str] = "permuted_x"
    permuted_x: Tensor
    group_ends: Tensor
    qexperts: Any
    activation: str = option("swiglu")
    deterministic: bool = option(False)

    def sizes(self):
        return {"rows": self.permuted_x.shape[0], **self._expert_sizes()}


@dataclass(frozen=True, eq=False)
class CombineCall(Call):
    """expert_out ``[R, H]``, pair_row int32 ``[T*K]``, topk_weights fp32 ``[T, K]``.
    Returns ``out[t] = sum_j w[t, j] * expert_out[pair_row[t*K + j]]`` (fp32 accumulation) ``[T, H]``
    in expert_out's dtype."""

    op: ClassVar[str] = MOE_COMBINE
    data: ClassVar[str] = "expert_out"
    expert_out: Tensor
    pair_row: Tensor
    topk_weights: Tensor
    num_tokens: int
    deterministic: bool = option(False)

    def sizes(self):
        return {"tokens": self.num_tokens, "top_k": self.topk_weights.shape[1], "rows": self.expert_out.shape[0],
                "hidden_size": self.expert_out.shape[1]}


@dataclass(frozen=True, eq=False)
class ForwardCall(Call):
    """The routed experts of a whole layer: x ``[T, H]``, topk_ids int32 ``[T, K]`` (values in
    ``[0, E)``), topk_weights fp32 ``[T, K]``, w13 ``[E, 2I, H]``, w2 ``[E, H, I]``.
    Returns ``combine(experts(permute(x)))`` ``[T, H]`` in x's dtype (shared experts are the core's)."""

    op: ClassVar[str] = MOE_FORWARD
    data: ClassVar[str] = "x"
    x: Tensor
    topk_ids: Tensor
    topk_weights: Tensor
    w13: Tensor
    w2: Tensor
    activation: str = option("swiglu")
    deterministic: bool = option(False)

    def sizes(self):
        return {"tokens": self.x.shape[0], "top_k": self.topk_ids.shape[1], **_weight_sizes(self.w13)}


@dataclass(frozen=True, eq=False)
class QuantForwardCall(_QuantizedCall):
    """:class:`ForwardCall` with the experts given as a :class:`mojo_opset.QuantizedExperts`."""

    op: ClassVar[str] = QUANT_MOE_FORWARD
    data: ClassVar[str] = "x"
    x: Tensor
    topk_ids: Tensor
    topk_weights: Tensor
    qexperts: Any
    activation: str = option("swiglu")
    deterministic: bool = option(False)

    def sizes(self):
        return {"tokens": self.x.shape[0], "top_k": self.topk_ids.shape[1], **self._expert_sizes()}



CALL_TYPES = {c.op: c for c in (GatingCall, PermuteCall, ExpertsCall, QuantExpertsCall, CombineCall, ForwardCall,
                                QuantForwardCall)}

for _cls in (RoutingOptions, *CALL_TYPES.values()):
    _META[_cls] = _compute_meta(_cls)
