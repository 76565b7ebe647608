"""Finding torch_npu lazily (availability, versions) and the per-call checks every npu op shares
(operator feature tests, release gates).

Test emulation: a stand-in ``torch_npu`` module that sets ``__mojo_emulation__ = True`` (the
project's tests install one, written in pure PyTorch from the operators' documented semantics)
makes this backend accept CPU tensors as if they were on an NPU.  A real torch_npu never sets that
attribute, so production behaviour is unaffected.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from mojo_opset.backend import OpImpl

EMULATION_FLAG = "__mojo_emulation__"


def import_torch_npu() -> tuple[Any, str | None]:
    """``(module, None)`` when torch_npu imports and an NPU is visible, else ``(None, reason)``.

    Never raises: without Ascend's CANN runtime the import fails with ImportError (a missing
    libhccl.so), a broken install with RuntimeError or OSError."""
    try:
        import torch_npu  # noqa: F401  (registers torch.npu and the "npu" device type)
    except (ImportError, RuntimeError, OSError) as exc:
        return None, f"torch_npu is not importable ({type(exc).__name__}: {exc})"
    npu = getattr(torch, "npu", None) or getattr(torch_npu, "npu", None)
    if npu is None or not hasattr(npu, "is_available"):
        return None, "torch_npu imported but provides no torch.npu device module"
    try:
        ok = bool(npu.is_available())
    except (RuntimeError, OSError) as exc:
        return None, f"torch.npu.is_available() raised {type(exc).__name__}: {exc}"
    if not ok:
        return None, "torch_npu is installed but no NPU device is available (torch.npu.is_available() is False)"
    return torch_npu, None


def torch_npu_module():
    """The imported torch_npu (the backend only loads once it has imported)."""
    mod = sys.modules.get("torch_npu")
    if mod is None:
        raise RuntimeError("torch_npu is not imported: the npu backend is unavailable")
    return mod


def is_emulation(mod=None) -> bool:
    mod = torch_npu_module() if mod is None else mod
    return getattr(mod, EMULATION_FLAG, False) is True


def version_tuple(mod=None) -> tuple[int, ...]:
    """torch_npu's release as a tuple, e.g. ``2.4.0.post2`` -> (2, 4, 0); () if unknown."""
    mod = torch_npu_module() if mod is None else mod
    parts = []
    for p in str(getattr(mod, "__version__", "")).split("+")[0].split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def missing_ops(*names: str, since: str) -> list[str]:
    """Reasons for operators the installed torch_npu lacks (feature test, as its docs advise)."""
    mod = torch_npu_module()
    return [f"torch_npu {getattr(mod, '__version__', '?')} has no {n} (needs torch_npu >= {since})"
            for n in names if not hasattr(mod, n)]


def release(mod=None) -> str:
    """torch_npu's release as text (for reasons)."""
    return ".".join(map(str, version_tuple(mod)))


def versions(mod) -> dict[str, str]:
    if mod is None:
        return {}
    out = {"torch_npu": str(getattr(mod, "__version__", "unknown"))}
    if is_emulation(mod):
        out["torch_npu"] += " (pure-PyTorch test emulation, not an NPU)"
    return out


class NpuOpImpl(OpImpl):
    """What every npu op shares: no backward, and reasons that depend on the installed torch_npu
    (its release and operators), hence ``state_key``: the torch_npu the backend loaded with (another
    one takes ``mo.refresh_backends()``, which loads new impls).  Plain data, so that a compiled
    graph can hold it.  Devices follow the backend's ``device_types`` (npu; cpu too under the test
    emulation)."""

    supports_autograd = False

    def __init__(self):
        mod = torch_npu_module()
        self._state = (str(getattr(mod, "__version__", "")), id(mod))

    def state_key(self):
        return self._state
