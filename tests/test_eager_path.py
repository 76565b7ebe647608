"""The lean eager path: environment reads, the router GEMM without autograd, the triton backend's
direct calls, and a compiled layer that does not recompile on every call."""
import os

import pytest
import torch

import mojo_opset as mo
from mojo_opset import registry
from mojo_opset.environ import env_flag, getenv
from mojo_opset.reference.router_gemm import router_logits


def test_environment_reads_follow_every_change(monkeypatch):
    monkeypatch.setenv("MOJO_TEST_VARIABLE", "é1")
    assert getenv("MOJO_TEST_VARIABLE") == os.environ["MOJO_TEST_VARIABLE"] == "é1"
    monkeypatch.setenv("MOJO_TEST_VARIABLE", "on")
    assert env_flag("MOJO_TEST_VARIABLE") is True
    monkeypatch.delenv("MOJO_TEST_VARIABLE")
    assert getenv("MOJO_TEST_VARIABLE") == "" and env_flag("MOJO_TEST_VARIABLE") is False


def test_router_gemm_without_grad_gives_the_autograd_bits():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 32, generator=g).bfloat16(), torch.randn(8, 32, generator=g).bfloat16(), torch.randn(8)
    plain = router_logits(x, w, b)
    tracked = router_logits(x, w.clone().requires_grad_(True), b)
    assert plain.grad_fn is None and tracked.grad_fn is not None
    assert torch.equal(plain, tracked.detach())


def test_a_compiled_layer_is_traced_once():
    g = torch.Generator().manual_seed(0)
    x, gw = torch.randn(4, 64, generator=g), torch.randn(8, 64, generator=g)
    w13, w2 = torch.randn(8, 64, 64, generator=g) * 0.1, torch.randn(8, 64, 32, generator=g) * 0.1
    torch._dynamo.reset()
    f = torch.compile(lambda inp: mo.moe_forward(inp, gw, w13, w2, 2, backend="torch"), fullgraph=True)
    for _ in range(10):      # a counter bumped inside the graph used to fail every call's guards
        y = f(x)
    torch.testing.assert_close(y, mo.moe_forward(x, gw, w13, w2, 2, backend="torch"))
    assert mo.explain()["compiled_calls"] > 0


def test_triton_eager_calls_skip_the_custom_op_only_when_nothing_traces():
    entry = registry.get_entry("triton")
    if entry is None or not entry.availability()[0]:
        pytest.skip("triton backend unavailable")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mojo_opset_triton.platform import eager as _eager

    assert _eager()
    with FakeTensorMode():
        assert not _eager()
