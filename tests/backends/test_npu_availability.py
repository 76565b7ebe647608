"""The npu backend's availability: unavailable with a reason without torch_npu or an NPU, and the
test emulation's CPU switch is the only way it takes CPU tensors."""
import importlib.abc
import importlib.machinery
import sys

import pytest
import torch

import mojo_opset as mo
from mojo_opset_npu import NpuBackend
from npu_emulation import installed, make_module


@pytest.fixture
def no_torch_npu():
    """Hide any torch_npu (real or stand-in) for one test."""
    saved = sys.modules.pop("torch_npu", None)
    sys.modules["torch_npu"] = None           # makes `import torch_npu` raise ImportError
    mo.refresh_backends()
    yield
    sys.modules.pop("torch_npu", None)
    if saved is not None:
        sys.modules["torch_npu"] = saved
    mo.refresh_backends()


class _FailingImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, exc):
        self.exc = exc

    def find_spec(self, name, path=None, target=None):
        if name == "torch_npu":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.exc


def test_unavailable_without_torch_npu(no_torch_npu):
    info = mo.available_backends()["npu"]
    assert info["available"] is False and "torch_npu is not importable" in info["reason"]
    assert mo.select_backend("moe_forward", "cpu") == "torch"
    x, gw = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.raises(mo.BackendError, match="torch_npu is not importable"):
        mo.moe_gating(x, gw, 2, backend="npu")
    ids, _ = mo.moe_gating(x, gw, 2)                        # nothing else breaks
    assert ids.shape == (3, 2)


@pytest.mark.parametrize("exc", [OSError("libhccl.so: cannot open shared object file"),
                                 RuntimeError("Failed to load the backend extension: torch_npu")])
def test_unavailable_when_import_raises(exc):
    finder = _FailingImport(exc)
    saved = sys.modules.pop("torch_npu", None)
    sys.meta_path.insert(0, finder)
    try:
        reason = NpuBackend().unavailable_reason()
    finally:
        sys.meta_path.remove(finder)
        sys.modules.pop("torch_npu", None)
        if saved is not None:
            sys.modules["torch_npu"] = saved
    assert type(exc).__name__ in reason and str(exc) in reason


def test_unavailable_without_a_device():
    with installed(make_module(device_available=False)):
        info = mo.available_backends()["npu"]
        assert info["available"] is False and "no NPU device" in info["reason"]


def test_cpu_tensors_need_the_emulation_flag():
    real_like = make_module()
    del real_like.__mojo_emulation__                     # what a real torch_npu looks like
    with installed(real_like):
        assert mo.available_backends()["npu"]["available"]
        x, gw = torch.randn(3, 8), torch.randn(6, 8)
        with mo.strict(), pytest.raises(mo.StrictFallbackError, match="serves npu tensors"):
            mo.moe_gating(x, gw, 2, backend="npu")
        assert mo.select_backend("moe_gating", "npu") == "npu"      # the default for NPU tensors
        assert mo.select_backend("moe_gating", "cpu") == "torch"


def test_emulation_is_reported_as_such():
    with installed(make_module()) as mod:
        assert mod.__mojo_emulation__ is True
        backend = mo.registry.get_entry("npu").backend
        assert mo.available_backends()["npu"]["available"]
        assert "emulation" in backend.versions()["torch_npu"]
        assert mo.select_backend("moe_gating", "cpu") == "torch"    # never the CPU default
    assert "torch_npu" not in sys.modules or sys.modules["torch_npu"] is not mod
