"""The ttx backend as a plugin: availability, selection, and its torch.library custom ops."""
import pytest
import torch

import mojo_opset as mo
from ttx_helpers import interpreted, random_ids

needs_interp = pytest.mark.skipif(not interpreted(), reason="needs the ttx backend under the Triton interpreter")


def test_listed_with_availability():
    info = mo.available_backends()["ttx"]
    if info["available"]:
        assert set(info["ops"]) == {"moe_gating", "moe_permute", "moe_experts", "moe_combine"}
    else:
        assert info["reason"]  # always says why


def test_never_the_default_for_cpu():
    assert mo.select_backend("moe_gating", "cpu") != "ttx"
    from mojo_opset.registry import get_entry
    backend = get_entry("ttx").backend
    assert backend.default_for == ("npu",) and backend.default_priority == 20
    assert "cpu" not in backend.default_for


@needs_interp
def test_custom_ops_pass_opcheck():
    g = torch.Generator().manual_seed(40)
    T, E, K, H, I = 5, 4, 2, 16, 16
    x = torch.randn(T, H, generator=g)
    ids = random_ids(T, E, K, generator=g)
    logits = torch.randn(T, E, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g)
    w2 = torch.randn(E, H, I, generator=g)
    ops = torch.ops.mojo_ttx
    px, _, ends, _, pair_row = ops.permute(x, ids, E, 8)
    y = ops.experts(px, ends, w13, w2)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.gating.default, (logits, K, "sigmoid", True, 1.0, None, 2, 1, "max"), test_utils=tests)
    torch.library.opcheck(ops.permute.default, (x, ids, E, 8), test_utils=tests)
    torch.library.opcheck(ops.experts.default, (px, ends, w13, w2), test_utils=tests)
    torch.library.opcheck(ops.combine.default, (y, pair_row, torch.rand(T, K, generator=g), T), test_utils=tests)


@needs_interp
def test_compiles_fullgraph():
    g = torch.Generator().manual_seed(41)
    T, E, K, H, I = 6, 4, 2, 16, 16
    x = torch.randn(T, H, generator=g)
    gate = torch.randn(E, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / 4
    w2 = torch.randn(E, H, I, generator=g) / 4
    ops = torch.ops.mojo_ttx

    def layer(x):
        ids, w, _ = ops.gating(x @ gate.t(), K, "softmax", False, 1.0, None, 1, 1, "top2_sum")
        px, _, ends, _, pair_row = ops.permute(x, ids, E, 1)
        return ops.combine(ops.experts(px, ends, w13, w2), pair_row, w, T)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), mo.moe_forward(x, gate, w13, w2, K, backend="torch"),
                               rtol=1e-5, atol=1e-5)
