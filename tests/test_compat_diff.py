"""forward_diff_with and its tolerance rules (the original's check_tol_diff), with the statistics it reports."""
import pytest
import torch

import mojo_opset as mo
from mojo_opset.compat import check_tol_diff


class _Scaled(mo.Backend):
    """A plugin whose experts are the reference's times ``factor`` (1.0: a correct kernel)."""
    device_types = ("cpu",)

    def __init__(self, name, factor):
        self.name, self.factor = name, factor

    def load(self):
        def forward(call):
            y = mo.moe_experts(call.permuted_x, call.group_ends, call.w13, call.w2, activation=call.activation,
                               backend="torch")
            return y * self.factor
        return {"moe_experts": mo.op_impl("moe_experts", forward)}


@pytest.fixture
def scaled_backends(monkeypatch):
    monkeypatch.delenv("MOJO_BACKEND", raising=False)
    mo.register_backend(_Scaled("compat_exact", 1.0))
    mo.register_backend(_Scaled("compat_off", 1.05))
    yield
    mo.unregister_backend("compat_exact")
    mo.unregister_backend("compat_off")


def _experts_pair(name, E=3, H=8, I=4):
    ref = mo.MojoExperts._registry.get("torch")(E, H, I)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    op = mo.MojoExperts._registry.get(name)(E, H, I)
    op.load_state_dict(ref.state_dict())
    return op, ref


def test_forward_diff_with_passes_and_fails_with_statistics(scaled_backends):
    counts = torch.tensor([3, 0, 2], dtype=torch.int32)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    op, ref = _experts_pair("compat_exact")
    assert type(op).__name__ == "Compat_exactExperts"
    mo.reset_stats()
    y = op.forward_diff_with(ref, x, counts, mixed_tol=True)
    assert torch.equal(y, ref(x, counts))
    # without autograd the plugin's kernel served the first forward (parameters require grad)
    assert mo.fallback_counts() == {}
    assert mo.explain()["served"].get("moe_experts/compat_exact/kernel") == 1
    bad, ref = _experts_pair("compat_off")
    with pytest.raises(AssertionError) as exc:
        bad.forward_diff_with(ref, x, counts, atol=1e-3, rtol=1e-3)
    msg = str(exc.value)
    assert "mismatch=" in msg and "total=40" in msg and "match_ratio=" in msg and "max_abs=" in msg
    bad.forward_diff_with(ref, x, counts, atol=1.0, rtol=0.06)      # 5 % off is within 6 % relative
    x0 = x.clone()
    bad.forward_diff_with(ref, x, counts, atol=1.0, rtol=0.06)
    assert torch.equal(x, x0)                                      # inputs are copied, never modified


def test_forward_diff_with_refuses_to_compare_an_implementation_with_itself(monkeypatch):
    monkeypatch.delenv("MOJO_BACKEND", raising=False)
    ref = mo.MojoMoEGating._registry.get("torch")(8, 4, 2)
    same = mo.MojoMoEGating._registry.get("torch")(8, 4, 2)
    x = torch.randn(3, 8)
    with pytest.raises(NotImplementedError, match="same implementation"):
        same.forward_diff_with(ref, x)
    auto = mo.MojoMoEGating(8, 4, 2)          # per-call selection: the reference for CPU tensors
    assert mo.select_backend("moe_gating", "cpu") == "torch"
    with pytest.raises(NotImplementedError):
        auto.forward_diff_with(ref, x)


def test_check_tol_diff_default_and_ptol_statistics():
    ref = torch.zeros(100)
    out = ref.clone()
    out[[3, 50, 99]] = 1.0
    with pytest.raises(AssertionError) as exc:
        check_tol_diff(out, ref)                         # atol = rtol = 1e-2: every element must pass
    msg = str(exc.value)
    assert "match=97 / mismatch=3 / total=100" in msg and "match_ratio=97.00000%" in msg
    assert "first mismatch at [3]" in msg and "max_abs=1" in msg
    [s] = check_tol_diff(out, ref, ptol=0.97)             # at least 97 % close
    assert (s.match, s.mismatch, s.total) == (97, 3, 100)
    with pytest.raises(AssertionError, match="ptol=98"):
        check_tol_diff(out, ref, ptol=0.98)
    with pytest.raises(ValueError, match="ptol"):
        check_tol_diff(out, ref, ptol=1.5)


def test_check_tol_diff_mixed_tolerance_and_special_values():
    ref = torch.tensor([0.5, -0.9, 10.0, 200.0])
    ok = ref + torch.tensor([2 ** -7, -2 ** -7, 10.0 * 2 ** -7, -200.0 * 2 ** -7])
    check_tol_diff(ok, ref, mixed_tol=True)
    with pytest.raises(AssertionError, match="mismatch=1"):       # 2**-5 absolute below 1 is too much
        check_tol_diff(ref + torch.tensor([2 ** -5, 0, 0, 0]), ref, mixed_tol=True)
    with pytest.raises(AssertionError, match="mismatch=1"):       # 2**-5 relative above 1 is too much
        check_tol_diff(ref * torch.tensor([1, 1, 1, 1 + 2 ** -5]), ref, mixed_tol=True)
    inf = torch.tensor([float("inf"), 1.0])
    check_tol_diff(inf.clone(), inf)                               # equal infinities match
    nan = torch.tensor([float("nan"), 1.0])
    with pytest.raises(AssertionError, match="mismatch=1"):        # NaN never matches, as in the original
        check_tol_diff(nan.clone(), nan)
    with pytest.raises(AssertionError, match="shape"):
        check_tol_diff(torch.zeros(3), torch.zeros(4))


def test_check_tol_diff_per_output_tolerances():
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    ids2 = ids.clone()
    ids2[1, 1] = 1
    stats = check_tol_diff((ids2, w + 5e-3), (ids, w), atol=(0, 1e-2), rtol=(0, 1e-2), ptol=(0.75, 1.0))
    assert [s.name for s in stats] == ["output[0]", "output[1]"] and stats[0].mismatch == 1
    with pytest.raises(AssertionError, match=r"output\[0\]"):
        check_tol_diff((ids2, w), (ids, w), atol=(0, 1e-2), rtol=(0, 1e-2), ptol=(0.8, 1.0))
