"""The machine a tool runs on: platform, versions, devices; and the Triton-interpreter switch."""
from __future__ import annotations

import importlib.util
import os
import platform
import sys
import warnings
from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except Exception:
        return None


def npu_available() -> bool:
    """True when torch_npu imports and sees an Ascend device (never raises)."""
    try:
        # find_spec raises ValueError for a module in sys.modules without __spec__
        if importlib.util.find_spec("torch_npu") is None:
            return False
        import torch
        import torch_npu  # noqa: F401

        return bool(torch.npu.is_available())
    except Exception:
        return False


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or npu_available()


def enable_interpreter_if_cpu_only() -> str:
    """On a machine with no GPU/NPU, turn the Triton interpreter on so Triton-kernel backends run
    on CPU tensors.  Must happen before triton is imported; returns a one-line note for the report."""
    if has_accelerator():
        return "accelerator present: Triton kernels run compiled"
    current = os.environ.get("TRITON_INTERPRET")
    if current == "1":
        return "no GPU: Triton interpreter on (TRITON_INTERPRET=1)"
    if "triton" in sys.modules:
        warnings.warn("triton was imported before TRITON_INTERPRET=1 could be set; Triton-kernel "
                      "backends may report themselves unavailable on this CPU-only machine", stacklevel=2)
        return "no GPU: triton already imported without the interpreter"
    os.environ["TRITON_INTERPRET"] = "1"
    return "no GPU: Triton interpreter turned on (TRITON_INTERPRET=1)"


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def interpreter_caveat() -> str | None:
    """Why the Triton interpreter would fail here, when it would: the interpreter of Triton before
    3.8 needs numpy before 2.3 (newer numpy breaks its ``range()`` over a runtime int)."""
    from packaging.version import Version

    triton, numpy = _version("triton"), _version("numpy")
    if not interpreter_on() or triton is None or numpy is None:
        return None
    if Version(triton) < Version("3.8") and Version(numpy) >= Version("2.3"):
        return (f"the Triton interpreter of triton {triton} needs numpy<2.3 (numpy {numpy} is installed): "
                "pip install 'numpy<2.3'")
    return None


def pick_device(requested: str | None = None):
    """The device a tool runs on: ``requested``, else cuda, else npu, else cpu."""
    import torch

    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: CUDA is not available on this machine")
        if dev.type == "npu" and not npu_available():
            raise ValueError(f"--device {requested}: no Ascend NPU (torch_npu) is available on this machine")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if npu_available():
        return torch.device("npu")
    return torch.device("cpu")


def devices() -> list[dict]:
    """Every device torch can see, with name and memory where known."""
    import torch

    out = [{"type": "cpu", "name": platform.processor() or platform.machine(), "count": os.cpu_count()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"type": "cuda", "index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                        "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count})
    if npu_available():
        import torch_npu  # noqa: F401

        for i in range(torch.npu.device_count()):
            out.append({"type": "npu", "index": i, "name": torch.npu.get_device_name(i)})
    return out


def versions() -> dict[str, str | None]:
    import torch

    import mojo_opset

    v = {"mojo_opset": mojo_opset.__version__, "python": platform.python_version(), "torch": torch.__version__,
         "cuda": torch.version.cuda, "triton": _version("triton"), "torch_npu": _version("torch_npu"),
         "numpy": _version("numpy")}
    hip = getattr(torch.version, "hip", None)
    if hip:
        v["hip"] = hip
    return v


def environment(device=None) -> dict:
    """The environment block of the tools' JSON reports."""
    import torch

    env = {"platform": platform.platform(), "machine": platform.machine(), "versions": versions(),
           "devices": devices(), "cuda_available": torch.cuda.is_available(),
           "triton_interpret": interpreter_on(),
           "mojo_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MOJO_")}}
    if device is not None:
        env["device"] = str(device)
    return env


def run_header(device, backend: str) -> tuple[str, str]:
    """(device name, "<device>; torch X, triton Y, mojo_opset Z; backend B"): the first line of a bench run."""
    import torch

    v = versions()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return name, (f"{name}; torch {v['torch']}, triton {v['triton'] or '-'}, mojo_opset {v['mojo_opset']}; "
                  f"backend {backend}")
