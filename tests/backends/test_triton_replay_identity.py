"""Replay bit-identity on the triton backend (issue: gradients on or off must not change the values).

With gradients on, the core keeps the gating kernel's weights and takes only their gradient from
the reference formulas, so a replayed (or merely differentiable) call gives the same bits."""
import pytest
import torch

import mojo_opset as mo

pytestmark = pytest.mark.skipif(not mo.available_backends().get("triton", {}).get("available"),
                                reason="triton backend unavailable")


def _layer(T=12, H=32, E=8, I=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.2).to(dev)   # noqa: E731
    return mk(T, H), mk(E, H), mk(E, 2 * I, H), mk(E, H, I)


def test_requires_grad_does_not_change_the_forward():
    x, gw, w13, w2 = _layer()
    with mo.strict():
        y0 = mo.moe_forward(x, gw, w13, w2, 3, route_norm=True, backend="triton")
        y1 = mo.moe_forward(x, gw.clone().requires_grad_(), w13, w2, 3, route_norm=True, backend="triton")
    assert torch.equal(y0, y1.detach())


def test_record_without_grad_replay_with_grad_is_bit_identical():
    x, gw, w13, w2 = _layer()
    with torch.no_grad(), mo.strict():
        y, info = mo.moe_forward(x, gw, w13, w2, 3, score_func="sigmoid", route_norm=True, return_router_info=True,
                                 backend="triton")
    g = gw.clone().requires_grad_()
    with mo.strict():
        yr, inf2 = mo.moe_forward(x, g, w13, w2, 3, score_func="sigmoid", route_norm=True,
                                  forced_expert_ids=info["topk_ids"], return_router_info=True, backend="triton")
    assert torch.equal(inf2["topk_weights"].detach(), info["topk_weights"])
    assert torch.equal(yr.detach(), y)
    yr.sum().backward()                     # and the router still gets its gradient
    assert g.grad is not None and g.grad.abs().sum() > 0
