"""Test setup: turn the Triton interpreter on when there is no GPU, before anything imports triton."""
import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    skip_npu = pytest.mark.skip(reason="needs an Ascend NPU")
    npu = False
    try:
        import torch_npu  # noqa: F401

        npu = bool(torch.npu.is_available())
    except Exception:
        npu = False
    for item in items:
        if "gpu" in item.keywords and not _has_cuda:
            item.add_marker(skip_gpu)
        if "npu" in item.keywords and not npu:
            item.add_marker(skip_npu)


@pytest.fixture(autouse=True)
def _fresh_dispatch_state():
    """Each test starts with no fallback history and no strict/backend overrides from the env."""
    import mojo_opset as mo

    mo.reset_stats()
    yield
    mo.reset_stats()
