"""The batch-invariant mode on an NVIDIA GPU, bf16: each token's output bit-identical over T from 1 to
4096 and over its batch mates, run to run, on the triton kernels and on the reference (whose input
gradient is checked too)."""
import pytest
import torch

import mojo_opset as mo

pytestmark = pytest.mark.gpu

TOKENS = (1, 2, 3, 15, 16, 17, 63, 64, 65, 200, 513, 1024, 2047, 4096)
# (H, I, E, K, routing): a softmax model and a DeepSeek-style grouped sigmoid router with expert bias
MODELS = {"softmax": (1024, 256, 32, 4, dict(route_norm=True)),
          "grouped": (1024, 256, 64, 8, dict(score_func="sigmoid", route_norm=True, route_scale=2.5,
                                             num_expert_groups=8, num_limited_groups=4))}


def _layer(H, I, E, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    return dict(gate_weight=r(E, H, scale=H ** -0.5), w13=r(E, 2 * I, H, scale=H ** -0.5),
                w2=r(E, H, I, scale=I ** -0.5), shared_w13=r(2 * I, H, scale=H ** -0.5),
                shared_w2=r(H, I, scale=I ** -0.5)), torch.randn(E, device="cuda", generator=g) * 0.01


def _pool(H, n=4200, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(n, H, device="cuda", generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("model", list(MODELS))
def test_every_token_count_gives_the_same_bits(model, backend):
    H, I, E, K, kw = MODELS[model]
    w, bias = _layer(H, I, E)
    if "num_expert_groups" in kw:
        kw = dict(kw, expert_bias=bias)
    pool = _pool(H)
    tokens = TOKENS if backend == "triton" else (1, 3, 64, 65, 1000, 4096)

    def fwd(rows):
        return mo.moe_forward(pool[rows], w["gate_weight"], w["w13"], w["w2"], K, backend=backend,
                              shared_w13=w["shared_w13"], shared_w2=w["shared_w2"], **kw)

    with mo.deterministic(), mo.strict():
        alone = fwd(torch.tensor([0], device="cuda"))[0]
        for T in tokens:
            first = fwd(torch.arange(T, device="cuda"))
            assert torch.equal(first[0], alone), ("first", T)
            mates = torch.cat([torch.randperm(4100, device="cuda")[:T - 1] + 50, torch.zeros(1, device="cuda",
                                                                                            dtype=torch.long)])
            assert torch.equal(fwd(mates)[-1], alone), ("among others", T)
        assert torch.equal(fwd(torch.arange(T, device="cuda")), first)      # run to run
    # the same layer without the mode is close (another tile configuration, other GEMM blocks)
    ref = fwd(torch.arange(64, device="cuda"))
    with mo.deterministic():
        det = fwd(torch.arange(64, device="cuda"))
    assert float((det.float() - ref.float()).norm() / ref.float().norm()) < 2e-2


def test_the_reference_input_gradient_is_batch_invariant():
    H, I, E, K, kw = MODELS["softmax"]
    w, _ = _layer(H, I, E)
    w = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    pool = _pool(H)
    gy = torch.randn(4200, H, device="cuda").to(torch.bfloat16)

    def dx(rows):
        x = pool[rows].clone().requires_grad_(True)
        y = mo.moe_forward(x, w["gate_weight"], w["w13"], w["w2"], K, shared_w13=w["shared_w13"],
                           shared_w2=w["shared_w2"], **kw)
        return torch.autograd.grad(y, (x, w["w13"]), gy[rows])

    with mo.deterministic():
        alone = dx(torch.tensor([0], device="cuda"))[0][0]
        for T in (2, 65, 1000, 4096):
            rows = torch.cat([torch.arange(T - 1, device="cuda") + 100, torch.zeros(1, device="cuda", dtype=torch.long)])
            assert torch.equal(dx(rows)[0][-1], alone), T
        a, b = dx(torch.arange(300, device="cuda")), dx(torch.arange(300, device="cuda"))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])           # weight gradients: run to run
    assert mo.last_served("moe_forward")["served_by"] == "fallback"          # the reference's backward
