"""A pure-PyTorch stand-in for ``torch_npu``, written from the operators' documented semantics
(/work/shared/TORCH_NPU_OPS.md), so the ``npu`` backend can be tested on a CPU.

It is an EMULATION: it says nothing about how the real operators behave where their documentation
is silent (ties of equal scores, NaN, rounding).  It marks itself with ``__mojo_emulation__ = True``,
which is what lets the backend accept CPU tensors; a real torch_npu never has that attribute.
The stand-in is strict where the documentation states a constraint (it raises), so a backend that
passes an argument the real operator rejects fails its tests here.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import sys
import types

from . import gating, gmm, quant, routing

DEFAULT_VERSION = "2.7.1"

OPERATORS = {
    "npu_moe_gating_top_k": gating.npu_moe_gating_top_k,
    "npu_moe_init_routing_v2": routing.npu_moe_init_routing_v2,
    "npu_moe_token_unpermute": routing.npu_moe_token_unpermute,
    "npu_moe_finalize_routing": routing.npu_moe_finalize_routing,
    "npu_grouped_matmul": gmm.npu_grouped_matmul,
    "npu_swiglu": gmm.npu_swiglu,
    "npu_dynamic_quant": quant.npu_dynamic_quant,
    "npu_dequant_swiglu_quant": quant.npu_dequant_swiglu_quant,
}
VERSION_AWARE = ("npu_moe_gating_top_k", "npu_moe_finalize_routing", "npu_grouped_matmul")


def _release(version: str) -> tuple:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())


def make_module(version: str = DEFAULT_VERSION, without=(), device_available: bool = True):
    """A stand-in ``torch_npu`` module: ``without`` names operators to leave out (an older release)."""
    mod = types.ModuleType("torch_npu")
    mod.__doc__ = "Pure-PyTorch emulation of torch_npu's MoE operators (tests only; not an NPU)."
    mod.__version__ = version
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)   # as an imported module has
    mod.__mojo_emulation__ = True
    mod.npu = types.SimpleNamespace(is_available=lambda: device_available, device_count=lambda: 1)
    unknown = set(without) - set(OPERATORS)
    if unknown:
        raise ValueError(f"unknown operators {sorted(unknown)}")
    for name, fn in OPERATORS.items():
        if name in without:
            continue
        if name in VERSION_AWARE:
            fn = functools.partial(fn, release=_release(version))
        setattr(mod, name, fn)
    return mod


@contextlib.contextmanager
def installed(module):
    """Put ``module`` in ``sys.modules['torch_npu']`` and rediscover backends; undo both on exit."""
    import mojo_opset as mo

    saved = sys.modules.get("torch_npu", None)
    had = "torch_npu" in sys.modules
    sys.modules["torch_npu"] = module
    mo.refresh_backends()
    try:
        yield module
    finally:
        if had:
            sys.modules["torch_npu"] = saved
        else:
            sys.modules.pop("torch_npu", None)
        mo.refresh_backends()
