"""The pytest plugin (mojo_backend fixture, --mojo-backends, mojo_backends marker) and the
assert-close helpers, as a downstream project uses them."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset.testing import assert_close, assert_close_to_reference, assert_routing_close, backends

import _fake_backends as fb

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _backends_loaded_here():
    """In-process pytester runs forget the modules they import: load every backend (and triton)
    in this process first so the inner runs reuse them instead of importing them a second time."""
    mo.available_backends()

DOWNSTREAM = '''
import pytest
import mojo_opset as mo

def test_runs_on(mojo_backend):
    assert mo.available_backends()[mojo_backend]["available"]
    assert mo.select_backend("moe_gating", "cpu") == mojo_backend   # inside mo.use_backend(mojo_backend)

@pytest.mark.mojo_backends("torch", "npu")
def test_marked(mojo_backend):
    assert mojo_backend == "torch"
'''


def test_fixture_parametrizes_over_selected_backends(pytester):
    pytester.makepyfile(DOWNSTREAM)
    res = pytester.runpytest_inprocess("--mojo-backends=torch,npu", "-v", "-rs")
    res.assert_outcomes(passed=2, skipped=2)
    res.stdout.fnmatch_lines(["*test_runs_on?torch? PASSED*", "*backend 'npu' is unavailable*"])


def test_default_is_every_available_backend(pytester):
    pytester.makepyfile(DOWNSTREAM)
    res = pytester.runpytest_inprocess("-v")
    n = len([b for b, r in mo.available_backends().items() if r["available"]])
    res.assert_outcomes(passed=n + 1, skipped=1)   # the marked test: torch passes, npu is skipped


def test_unknown_backend_is_a_usage_error(pytester):
    pytester.makepyfile(DOWNSTREAM)
    res = pytester.runpytest_inprocess("--mojo-backends=nope")
    assert res.ret != 0
    res.stdout.fnmatch_lines(["*UsageError: --mojo-backends: unknown backend(s) nope; registered: torch*"])


def test_strict_option_turns_fallbacks_into_failures(pytester):
    names = fb.register(fb.declining())
    try:
        pytester.makepyfile('''
import torch
from mojo_opset.reference.permute import permute_reference
from mojo_opset import dispatch
from mojo_opset.contract import ExpertsCall

def test_experts(mojo_backend):
    x = torch.randn(4, 8)
    ids = torch.tensor([[0], [1], [0], [1]], dtype=torch.int32)
    px, _, ends, _, _ = permute_reference(x, ids, 2)
    w13, w2 = torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    from mojo_opset.functional.experts import experts_reference_call
    dispatch.dispatch(ExpertsCall(permuted_x=px, group_ends=ends, w13=w13, w2=w2, activation="swiglu"),
                      experts_reference_call)
''')
        pytester.runpytest_inprocess("--mojo-backends=fake_declining").assert_outcomes(passed=1)
        res = pytester.runpytest_inprocess("--mojo-backends=fake_declining", "--mojo-strict")
        res.assert_outcomes(failed=1)
        res.stdout.fnmatch_lines(["*StrictFallbackError*no thanks*"])
    finally:
        fb.unregister(names)


def _forward_args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, generator=g)
    gate = torch.randn(4, 16, generator=g) / 4
    w13 = torch.randn(4, 16, 16, generator=g) / 4
    w2 = torch.randn(4, 16, 8, generator=g) / 3
    return x, gate, w13, w2, 2


def test_assert_close_to_reference_passes_and_fails_with_a_report():
    names = fb.register(fb.good(), fb.broken_experts())
    try:
        y = assert_close_to_reference(mo.moe_forward, *_forward_args(), backend="fake_good", strict=True)
        assert y.shape == (7, 16)
        with pytest.raises(AssertionError, match=r"backend 'fake_broken': not close to the reference:\n  out: \d+ of 112"):
            assert_close_to_reference(mo.moe_forward, *_forward_args(), backend="fake_broken")
        # a looser tolerance given by the caller is honoured
        assert_close_to_reference(mo.moe_forward, *_forward_args(), backend="fake_broken", atol=1.0, rtol=1.0)
    finally:
        fb.unregister(names)


def test_assert_close_and_routing_helpers():
    a = (torch.ones(3), torch.tensor([1, 2], dtype=torch.int32))
    assert_close(a, (torch.ones(3) + 1e-6, torch.tensor([1, 2], dtype=torch.int32)))
    with pytest.raises(AssertionError, match=r"out\[1\]: 1 of 2 elements differ"):
        assert_close(a, (torch.ones(3), torch.tensor([1, 3], dtype=torch.int32)))
    s = torch.tensor([[0.5, 0.3, 0.2]])
    assert_routing_close(torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32), s)
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_routing_close(torch.tensor([[0, 2]], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32), s)
    assert "torch" in backends() and "torch" not in backends(include_reference=False)
