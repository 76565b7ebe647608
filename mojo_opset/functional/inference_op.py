"""The whole MoE forward as one opaque ``torch.library`` op for compiled inference.

A ``torch.compile``'d inference call of ``moe_forward`` on CUDA would trace the routing, the backend's
ops and the router-info bookkeeping into a graph that pays a custom-op call per kernel op on every
run.  Inference needs none of that tracing (no autograd, no fusion across the MoE boundary), so a
compiled call that needs no gradient and runs on a backend (not the reference) calls this single op
instead; its implementation is the eager forward, with the graph replay of :mod:`.eager_graphs`.
The op's outputs are y and, when asked, the router info, with shapes and dtypes given by
:func:`_fake`.
"""
from __future__ import annotations

import functools
import json

import torch

from ..contract.names import MOE_FORWARD
from ..dispatch import select_backend
from ..modes import deterministic, is_deterministic
from ..registry import REFERENCE
from . import eager_graphs
from .routing import ROUTING_SCALARS


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo at import time."""
    fn._dynamo_marked_constant = True
    return fn


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "None": None}
_INFO = ("scores", "topk_ids", "topk_weights", "logits", "tokens_per_expert")


_forward: list = [None]


def bind(run_moe) -> None:
    """The eager forward the op runs (``functional.forward.run_moe``, which imports this module)."""
    _forward[0] = run_moe


DEVICES = ("cuda",)     # where compiled inference calls take the op (tests add "cpu")


def wanted(x, tensors, backend) -> bool:
    """A compiled inference call on CUDA served by a backend, with graph replay on (decided at
    trace time: ``MOJO_EAGER_GRAPHS=0`` keeps compiled calls traced op by op too)."""
    if not torch.compiler.is_compiling() or x.device.type not in DEVICES:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
        return False
    return _served_by_backend(x.device.type, backend) and _graphs_on()


@_assume_constant_result
def _served_by_backend(device_type: str, backend) -> bool:
    return select_backend(MOE_FORWARD, device_type, backend) != REFERENCE


@_assume_constant_result
def _graphs_on() -> bool:
    return eager_graphs.enabled()


def call(x, tensors: tuple, top_k: int, routing_kw: dict, quant, activation: str, return_router_info: bool,
         backend):
    """``y`` (and the router info dict) through the op; ``tensors``: gate_weight, gate_bias,
    expert_bias, the three shared tensors, then the experts' tensors; ``quant``: (scheme, group size)
    for quantized experts, else None."""
    routing = tuple((k, routing_kw[k] if k != "router_dtype" else _dtype_name(routing_kw[k]))
                    for k in ROUTING_SCALARS)
    spec = _spec(top_k, activation, return_router_info, backend, quant, is_deterministic(), routing)
    outs = torch.ops.mojo.moe_inference(x, list(tensors), spec)
    if not return_router_info:
        return outs[0]
    return outs[0], dict(zip(_INFO, outs[1:]))


def _dtype_name(dt) -> str:
    for name, d in _DTYPES.items():
        if d == dt:
            return name
    raise ValueError(f"router_dtype {dt} is not one of {list(_DTYPES)}")


@_assume_constant_result   # a constant string in the graph (json is not traceable)
def _spec(top_k, activation, info, backend, quant, det, routing) -> str:
    return json.dumps(dict(top_k=top_k, activation=activation, info=info, backend=backend,
                           quant=None if quant is None else list(quant), deterministic=det,
                           routing=dict(routing)), sort_keys=True)


# Defined with torch.library.Library rather than torch.library.custom_op: the latter's Python layers
# (aliasing checks, autograd registration) cost 15-30 us per call, a fifth of a compiled decode step's
# host time; this op needs none of them (no autograd: inference only; fresh outputs).
_LIB = torch.library.Library("mojo", "FRAGMENT")
_LIB.define("moe_inference(Tensor x, Tensor?[] tensors, str spec) -> Tensor[]")


@functools.lru_cache(maxsize=256)
def _parse(spec: str) -> dict:
    """The spec's JSON, parsed once per distinct spec (callers must not mutate the result)."""
    s = json.loads(spec)
    s["router_dtype"] = _DTYPES[s["routing"]["router_dtype"]]
    return s


def moe_inference(x: torch.Tensor, tensors: list, spec: str) -> list[torch.Tensor]:
    s = _parse(spec)
    routing = dict(s["routing"], router_dtype=s["router_dtype"])
    gate_weight, gate_bias, expert_bias, *rest = tensors
    shared, weights = tuple(rest[:3]), rest[3:]
    routing.update(gate_bias=gate_bias, expert_bias=expert_bias, forced_expert_ids=None)
    if s["quant"] is not None:
        from ..quant.qexperts import QuantizedExperts

        scheme, group = s["quant"]
        w13_q, w13_scale, w2_q, w2_scale, w13_smooth, w2_smooth = weights
        experts = QuantizedExperts.from_tensors(scheme, w13_q, w13_scale, w2_q, w2_scale, group,
                                                w13_smooth=w13_smooth, w2_smooth=w2_smooth)
    else:
        experts = tuple(weights)
    with deterministic(s["deterministic"]):
        out = _forward[0](x, gate_weight, s["top_k"], routing, experts=experts, quantized=s["quant"] is not None,
                          activation=s["activation"], shared=shared, ep_group=None, ep_mode="allgather",
                          return_router_info=s["info"], backend=s["backend"])
    if not s["info"]:
        return [out]
    y, info = out
    return [y, *(info[k] for k in _INFO)]


_LIB.impl("moe_inference", moe_inference, "CompositeExplicitAutograd")


@torch.library.register_fake("mojo::moe_inference", lib=_LIB)
def _fake(x, tensors, spec):
    s = _parse(spec)
    y = torch.empty_like(x)
    if not s["info"]:
        return [y]
    T, E, K = x.numel() // x.shape[-1], tensors[0].shape[0], s["top_k"]
    logits_dtype = s["router_dtype"] or x.dtype
    return [y, x.new_empty(T, E, dtype=torch.float32), x.new_empty(T, K, dtype=torch.int32),
            x.new_empty(T, K, dtype=torch.float32), x.new_empty(T, E, dtype=logits_dtype),
            x.new_empty(E, dtype=torch.int32)]
