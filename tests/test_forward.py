"""SPEC §3.5: moe_forward (torch reference) against a naive per-token loop, forward and backward."""
import pytest
import torch

import mojo_opset as mo
from naive_moe import make_moe, naive_moe

ROUTINGS = {
    "softmax": dict(top_k=2),
    "deepseek": dict(top_k=3, score_func="sigmoid", route_norm=True, route_scale=2.5, num_expert_groups=4,
                     num_limited_groups=2, expert_bias="random"),
}
SHARED = {"none": {}, "shared": dict(shared=True), "shared_gate": dict(shared=True, shared_gate=True)}
PARAMS = ("x", "gate_weight", "gate_bias", "w13", "w2", "shared_w13", "shared_w2", "shared_gate")


def setup(dtype, routing, shared, E=8, seed=0, requires_grad=True):
    d = make_moe(T=10, H=16, E=E, I=8, dtype=dtype, seed=seed, gate_bias=True, requires_grad=requires_grad,
                 **SHARED[shared])
    kw = dict(ROUTINGS[routing])
    if kw.get("expert_bias") == "random":
        kw["expert_bias"] = torch.randn(E, generator=torch.Generator().manual_seed(seed)) * 0.05
    return d, kw


def call_moe(d, kw, **extra):
    d = dict(d)
    args = [d.pop(k) for k in ("x", "gate_weight", "w13", "w2")]
    kw = dict(kw)
    return mo.moe_forward(*args, kw.pop("top_k"), **d, **kw, **extra)


def call_naive(d, kw, ids=None):
    d = dict(d)
    args = [d.pop(k) for k in ("x", "gate_weight", "w13", "w2")]
    kw = dict(kw)
    return naive_moe(*args, kw.pop("top_k"), ids=ids, **d, **kw)


def assert_close_scaled(got, ref, rel):
    """Tolerance relative to the largest magnitude of the reference (bf16 roundings are absolute)."""
    torch.testing.assert_close(got.float(), ref.float(), rtol=rel, atol=rel * max(ref.abs().max().item(), 1e-6))


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 2e-5), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("shared", sorted(SHARED))
def test_forward_and_gradients_match_naive(dtype, rel, routing, shared):
    d, kw = setup(dtype, routing, shared)
    y, info = call_moe(d, kw, return_router_info=True)
    assert y.dtype == dtype and y.shape == d["x"].shape
    ref_d = {k: v.detach().float().requires_grad_() for k, v in d.items()}
    ref, ids, w = call_naive(ref_d, kw)
    assert torch.equal(info["topk_ids"].long(), ids)
    assert_close_scaled(info["topk_weights"], w, 1e-5)
    assert_close_scaled(y, ref, rel)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    y.backward(grad.to(dtype))
    ref.backward(grad.to(dtype).float())
    for name in PARAMS:
        if name in d:
            assert d[name].grad is not None and d[name].grad.dtype == dtype, name
            assert_close_scaled(d[name].grad, ref_d[name].grad, rel * 2)


def test_router_info_contents():
    d, kw = setup(torch.float32, "deepseek", "none", requires_grad=False)
    y, info = call_moe(d, kw, return_router_info=True)
    assert set(info) == {"scores", "topk_ids", "topk_weights", "tokens_per_expert", "logits"}
    torch.testing.assert_close(info["logits"], d["x"].float() @ d["gate_weight"].float().t() + d["gate_bias"].float())
    ids, w, scores = mo.moe_gating(d["x"], d["gate_weight"], 3, gate_bias=d["gate_bias"], return_scores=True,
                                   **{k: v for k, v in kw.items() if k != "top_k"})
    assert torch.equal(info["topk_ids"], ids) and torch.equal(info["topk_weights"], w)
    assert torch.equal(info["scores"], scores)
    assert info["scores"].shape == (10, 8) and info["scores"].dtype == torch.float32
    torch.testing.assert_close(info["scores"], torch.sigmoid(d["x"] @ d["gate_weight"].t() + d["gate_bias"]))
    tpe = info["tokens_per_expert"]
    assert tpe.dtype == torch.int32 and tpe.shape == (8,)
    assert torch.equal(tpe.long(), torch.bincount(ids.view(-1).long(), minlength=8))
    assert torch.equal(y, call_moe(d, kw))


def test_leading_dims():
    d, kw = setup(torch.float32, "softmax", "shared", requires_grad=False)
    x3 = d["x"].reshape(2, 5, 16)
    y3, info = call_moe({**d, "x": x3}, kw, return_router_info=True)
    assert y3.shape == (2, 5, 16) and info["topk_ids"].shape == (10, 2)
    assert torch.equal(y3.reshape(10, 16), call_moe(d, kw))


def test_non_contiguous_inputs():
    d, kw = setup(torch.float32, "deepseek", "shared_gate", requires_grad=False)
    y = call_moe(d, kw)
    nc = {
        "x": d["x"].t().contiguous().t(),                                  # column-major
        "gate_weight": torch.stack([d["gate_weight"], d["gate_weight"]], 2).view(8, 32)[:, ::2],
        "w13": d["w13"].transpose(1, 2).contiguous().transpose(1, 2),
        "w2": d["w2"].transpose(0, 2).contiguous().transpose(0, 2),
        "shared_w13": d["shared_w13"].t().contiguous().t(),
        "shared_w2": d["shared_w2"].t().contiguous().t(),
    }
    for k, v in nc.items():
        assert not v.is_contiguous() and torch.equal(v, d[k]), k
    torch.testing.assert_close(call_moe({**d, **nc}, kw), y, rtol=1e-6, atol=1e-6)
    x_strided = torch.stack([d["x"], d["x"]], 1)[:, 1]          # a strided view of rows
    torch.testing.assert_close(call_moe({**d, "x": x_strided}, kw), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_ids_equal_to_natural_are_bit_identical(dtype):
    d, kw = setup(dtype, "deepseek", "shared_gate")
    y, info = call_moe(d, kw, return_router_info=True)
    y.sum().backward()
    grads = {k: v.grad.clone() for k, v in d.items()}
    for v in d.values():
        v.grad = None
    y_f = call_moe(d, kw, forced_expert_ids=info["topk_ids"])
    y_f.sum().backward()
    assert torch.equal(y, y_f)
    for k, v in d.items():
        assert torch.equal(v.grad, grads[k]), k


def test_forced_ids_drive_the_experts():
    d, kw = setup(torch.float32, "softmax", "none", requires_grad=False)
    forced = torch.tensor([[7, 6]] * 5 + [[0, 1]] * 5)
    y, info = call_moe(d, kw, forced_expert_ids=forced, return_router_info=True)
    ref, _, _ = call_naive(d, kw, ids=forced)
    torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-5)
    assert info["tokens_per_expert"].tolist() == [5, 5, 0, 0, 0, 0, 5, 5]


def test_empty_tokens():
    d, kw = setup(torch.float32, "softmax", "shared", requires_grad=False)
    x = torch.zeros(2, 0, 16)
    y, info = call_moe({**d, "x": x}, kw, return_router_info=True)
    assert y.shape == (2, 0, 16)
    assert info["topk_ids"].shape == (0, 2) and info["tokens_per_expert"].eq(0).all()


def test_nan_and_inf_in_x_propagate():
    d, kw = setup(torch.float32, "deepseek", "none", requires_grad=False)
    x = d["x"].clone()
    x[3] = float("nan")
    x[5, 0] = float("inf")
    y, info = call_moe({**d, "x": x}, kw, return_router_info=True)
    ids = info["topk_ids"]
    assert ids.min() >= 0 and ids.max() < 8
    assert ids[3].tolist() == [0, 1, 2]
    assert torch.isnan(y[3]).all()
    assert not torch.isfinite(y[5]).all()
    finite = [t for t in range(10) if t not in (3, 5)]
    torch.testing.assert_close(y[finite], call_moe({**d, "x": d["x"]}, kw)[finite])


def test_fp32_weights_with_bf16_tokens():
    """Expert and shared weights of another dtype run in x's dtype (as if cast first); grads keep theirs."""
    d, kw = setup(torch.float32, "softmax", "shared_gate")
    x = d["x"].detach().to(torch.bfloat16)
    y = call_moe({**d, "x": x}, kw)
    assert y.dtype == torch.bfloat16
    cast = {k: (v.detach().to(torch.bfloat16) if k in ("w13", "w2", "shared_w13", "shared_w2") else v)
            for k, v in d.items()}
    assert torch.equal(y, call_moe({**cast, "x": x}, kw))
    y.float().sum().backward()
    for name in ("gate_weight", "w13", "w2", "shared_w13", "shared_w2", "shared_gate"):
        assert d[name].grad.dtype == torch.float32 and d[name].grad.abs().sum() > 0, name
