"""nn.Module forms: declarative config/build, deterministic init, forward == functional ops."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import mojo_opset as mo
from mojo_opset import losses

H, E, I, K = 16, 8, 8, 2


def make_cfg(**router_kw):
    router = dict(top_k=K)
    router.update(router_kw)
    return mo.MoE.Config(num_experts=E, experts=mo.GroupedExperts.Config(intermediate_size=I),
                         router=mo.Router.Config(**router),
                         shared_experts=mo.SharedExperts.Config(intermediate_size=4, gate=True))


def test_build_fills_sizes_without_mutating_config():
    cfg = make_cfg()
    m = cfg.build(hidden_size=H)
    assert cfg.hidden_size is None and cfg.router.hidden_size is None  # the user's config is untouched
    assert m.config.hidden_size == H
    assert m.gate.config.hidden_size == H and m.gate.config.num_experts == E
    assert m.experts.config.num_experts == E and m.shared_experts.config.hidden_size == H
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"gate.weight": (E, H), "experts.gate_up_proj": (E, 2 * I, H), "experts.down_proj": (E, H, I),
                      "shared_experts.gate_up_proj": (8, H), "shared_experts.down_proj": (H, 4),
                      "shared_experts.shared_gate": (1, H)}


def test_optional_router_tensors_and_fp32_expert_bias():
    m = make_cfg(bias=True, expert_bias=True).build(hidden_size=H)
    assert m.gate.bias.shape == (E,) and m.gate.expert_bias.dtype == torch.float32
    assert "gate.expert_bias" in m.state_dict()
    m.gate.expert_bias.copy_(torch.linspace(-1e-3, 1e-3, E))
    want = m.gate.expert_bias.clone()
    m.to(torch.bfloat16)
    assert m.gate.weight.dtype == torch.bfloat16
    assert m.gate.expert_bias.dtype == torch.float32 and torch.equal(m.gate.expert_bias, want)
    m.half()
    assert m.gate.expert_bias.dtype == torch.float32 and torch.equal(m.gate.expert_bias, want)


def test_size_errors():
    with pytest.raises(ValueError, match="hidden_size is not set"):
        make_cfg().build()
    with pytest.raises(ValueError, match="parent builds it with"):
        dataclasses.replace(make_cfg(), experts=mo.GroupedExperts.Config(intermediate_size=I, hidden_size=3)).build(
            hidden_size=H)
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        make_cfg(top_k=E + 1).build(hidden_size=H)
    with pytest.raises(ValueError, match="num_expert_groups"):
        make_cfg(num_expert_groups=3).build(hidden_size=H)
    with pytest.raises(ValueError, match="num_limited_groups x experts per group"):
        make_cfg(top_k=4, num_expert_groups=4, num_limited_groups=1).build(hidden_size=H)
    with pytest.raises(ValueError, match="activation"):
        mo.GroupedExperts.Config(intermediate_size=I, activation="gelu").build(hidden_size=H, num_experts=E)
    with pytest.raises(ValueError, match="aux_loss"):
        dataclasses.replace(make_cfg(), aux_loss="bogus").build(hidden_size=H)
    with pytest.raises(TypeError, match="seed"):
        make_cfg().build(hidden_size=H).init_weights(1.5)


def test_init_weights_deterministic_and_dtype_independent():
    a = make_cfg(bias=True).build(hidden_size=H)
    b = make_cfg(bias=True).build(hidden_size=H)
    a.init_weights(7)
    b.init_weights(torch.Generator().manual_seed(7))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    b.init_weights(8)
    assert not torch.equal(a.experts.gate_up_proj, b.experts.gate_up_proj)
    c = make_cfg(bias=True).build(hidden_size=H, dtype=torch.bfloat16)
    c.init_weights(7)
    assert torch.equal(c.experts.down_proj, a.experts.down_proj.to(torch.bfloat16))
    assert a.experts.gate_up_proj.std().item() == pytest.approx(0.02, rel=0.1)


ROUTINGS = [
    dict(),
    dict(route_norm=True, route_scale=2.0, bias=True),
    dict(score_func="sigmoid", route_norm=True, route_scale=2.5, num_expert_groups=4, num_limited_groups=2,
         expert_bias=True),
    dict(num_expert_groups=2, num_limited_groups=1, group_score="max", router_dtype=None),
]


@pytest.mark.parametrize("router_kw", ROUTINGS)
def test_forward_equals_functional(router_kw):
    m = make_cfg(**router_kw).build(hidden_size=H)
    m.init_weights(3)
    if m.gate.expert_bias is not None:
        m.gate.expert_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(1)) * 0.05)
    if m.gate.bias is not None:
        with torch.no_grad():
            m.gate.bias.copy_(torch.randn(E) * 0.1)
    x = torch.randn(2, 5, H)
    y, info = m(x, return_router_info=True)
    g = m.gate
    y_ref, info_ref = mo.moe_forward(
        x, g.weight, m.experts.gate_up_proj, m.experts.down_proj, K, gate_bias=g.bias,
        score_func=g.config.score_func, route_norm=g.config.route_norm, route_scale=g.config.route_scale,
        expert_bias=g.expert_bias, num_expert_groups=g.config.num_expert_groups,
        num_limited_groups=g.config.num_limited_groups, group_score=g.config.group_score,
        router_dtype=g.config.router_dtype, shared_w13=m.shared_experts.gate_up_proj,
        shared_w2=m.shared_experts.down_proj, shared_gate=m.shared_experts.shared_gate, return_router_info=True)
    assert torch.equal(y, y_ref)
    for k in info_ref:
        assert torch.equal(info[k], info_ref[k]), k
    assert torch.equal(m.last_topk_ids, info["topk_ids"])
    assert torch.equal(m.last_tokens_per_expert, info["tokens_per_expert"])
    assert torch.equal(m(x), y)   # without router info: the same output


def test_submodule_forwards():
    m = make_cfg(route_norm=True).build(hidden_size=H)
    m.init_weights(5)
    x = torch.randn(6, H)
    ids, w = m.gate(x)
    ids_ref, w_ref = mo.moe_gating(x, m.gate.weight, K, route_norm=True)
    assert torch.equal(ids, ids_ref) and torch.equal(w, w_ref)
    w13, w2 = m.experts.gate_up_proj, m.experts.down_proj
    naive = torch.zeros(6, H)
    for t in range(6):
        for j in range(K):
            e = int(ids[t, j])
            h = w13[e] @ x[t]
            naive[t] += w[t, j] * (w2[e] @ (F.silu(h[:I]) * h[I:]))
    torch.testing.assert_close(m.experts(x, ids, w), naive, rtol=1e-5, atol=1e-6)
    s = m.shared_experts
    h = x @ s.gate_up_proj.T
    naive_s = torch.sigmoid(x @ s.shared_gate.T) * ((F.silu(h[:, :4]) * h[:, 4:]) @ s.down_proj.T)
    torch.testing.assert_close(s(x), naive_s, rtol=1e-5, atol=1e-6)
    y = m(x)
    torch.testing.assert_close(y, naive + naive_s, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"topk_ids must have shape \[T, K\] with T = 6"):
        m.experts(x, ids[:3], w)
    with pytest.raises(ValueError, match=r"topk_weights must have shape \[6, 2\]"):
        m.experts(x, ids, w[:, :1])


BACKENDS = ["torch", "triton", "ttx"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_experts_validates_ids(backend):
    """The module takes ids as the functional ops do: integer [T, K] in [0, E), else an error naming
    topk_ids (a float id was truncated; an id outside [0, E) was dropped, read out of bounds or raised
    an IndexError, depending on the backend)."""
    if not mo.available_backends().get(backend, {}).get("available"):
        pytest.skip(f"backend {backend} unavailable")
    ex = make_cfg().build(hidden_size=H).experts
    x = torch.randn(3, H)
    w = torch.rand(3, K)
    ok = torch.tensor([[0, 1], [2, 7], [5, 3]])
    assert ex(x, ok, w, backend=backend).shape == (3, H)
    assert torch.equal(ex(x, ok.to(torch.int32), w, backend=backend), ex(x, ok, w, backend=backend))
    with pytest.raises(TypeError, match=r"topk_ids must have dtype in \(int32, int64\), got float32"):
        ex(x, ok.float() + 0.7, w, backend=backend)
    with pytest.raises(TypeError, match="topk_ids must have dtype"):
        ex(x, ok.bool(), w, backend=backend)
    for bad in (E, E + 5, -1):
        ids = ok.clone()
        ids[1, 1] = bad
        with pytest.raises(ValueError, match=rf"topk_ids must lie in \[0, {E}\)"):
            ex(x, ids, w, backend=backend)
    with pytest.raises(ValueError, match=r"topk_ids must have 2 dimensions"):
        ex(x, ok.reshape(-1), w.reshape(-1), backend=backend)
    with pytest.raises(TypeError, match=r"topk_weights must have dtype"):
        ex(x, ok, w.to(torch.int64), backend=backend)
    with pytest.raises(ValueError, match=r"x must have 2 dimensions"):
        ex(x[None], ok, w, backend=backend)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        ex(x.tolist(), ok, w, backend=backend)


def test_forced_ids_and_backend_argument():
    cfg = dataclasses.replace(make_cfg(), backend="torch")
    m = cfg.build(hidden_size=H)
    x = torch.randn(4, H)
    forced = torch.tensor([[1, 0], [7, 3], [2, 5], [4, 6]])
    m(x, forced_expert_ids=forced)
    assert torch.equal(m.last_topk_ids, forced.to(torch.int32))
    assert mo.last_served("moe_forward")["backend"] == "torch"


def test_training_state_and_aux_losses():
    cfg = dataclasses.replace(make_cfg(expert_bias=True), aux_loss="switch", aux_loss_coeff=0.01,
                              z_loss_coeff=0.001, bias_update_rate=0.1)
    m = cfg.build(hidden_size=H)
    x = torch.randn(2, 6, H)
    m.eval()
    m(x)
    assert int(m.expert_load.sum()) == 0 and m.last_aux_losses == {}
    m.train()
    _, info = m(x, return_router_info=True)
    _, info2 = m(x, return_router_info=True)
    assert torch.equal(m.expert_load, 2 * info["tokens_per_expert"].long())
    want_lb = 0.01 * losses.load_balancing_loss(info2["scores"], info2["topk_ids"])
    logits = x.reshape(-1, H) @ m.gate.weight.T
    want_z = 0.001 * losses.router_z_loss(logits)
    torch.testing.assert_close(m.last_aux_losses["load_balancing"], want_lb)
    torch.testing.assert_close(m.last_aux_losses["z"], want_z)
    total = losses.collect_aux_losses(m)
    torch.testing.assert_close(total, want_lb + want_z)
    total.backward()
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
    load = m.expert_load.clone().float()
    bias = m.update_expert_bias()
    torch.testing.assert_close(bias, 0.1 * torch.sign(load.mean() - load))
    assert int(m.expert_load.sum()) == 0
    assert losses.update_expert_biases(m) == 1
    with pytest.raises(RuntimeError, match="expert_bias=True"):
        make_cfg().build(hidden_size=H).update_expert_bias()


@pytest.mark.parametrize("aux", ["switch", "sequence", "global", None])
@pytest.mark.parametrize("z", [0.0, 0.01])
def test_aux_and_z_loss_with_non_reentrant_checkpointing(aux, z):
    """The recomputed forward saves what the original saved (its losses included); the training
    state is updated once per forward."""
    if aux is None and not z:
        pytest.skip("no loss configured")
    from torch.utils.checkpoint import checkpoint

    cfg = dataclasses.replace(make_cfg(), aux_loss=aux, aux_loss_coeff=0.1 if aux else 0.0, z_loss_coeff=z)
    x0 = torch.randn(2, 3, H)

    def run(ckpt):
        m = cfg.build(hidden_size=H).train()
        x = x0.clone().requires_grad_(True)
        y = checkpoint(m, x, use_reentrant=False) if ckpt else m(x)
        aux_total = losses.collect_aux_losses(m)
        ((y * torch.linspace(-1, 1, H)).sum() + 100 * aux_total).backward()
        return m, x.grad, aux_total.detach()

    ref, ref_x, ref_aux = run(False)
    got, got_x, got_aux = run(True)
    assert torch.equal(got_aux, ref_aux)
    assert torch.equal(got.expert_load, ref.expert_load)   # the recompute did not count again
    torch.testing.assert_close(got_x, ref_x)
    for (n, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_sequence_aux_loss_uses_sequence_dim():
    cfg = dataclasses.replace(make_cfg(), aux_loss="sequence", aux_loss_coeff=1.0)
    m = cfg.build(hidden_size=H).train()
    x = torch.randn(3, 4, H)
    _, info = m(x, return_router_info=True)
    want = losses.sequence_load_balancing_loss(info["scores"], info["topk_ids"], seq_len=4)
    torch.testing.assert_close(m.last_aux_losses["load_balancing"], want)


def test_quantized_experts_path():
    m = make_cfg(route_norm=True).build(hidden_size=32)
    x = torch.randn(5, 32)
    m.quantize("w8a16_int8")
    y = m(x)
    s = m.shared_experts
    y_ref = mo.quant_moe_forward(x, m.gate.weight, m.quantized, K, route_norm=True, shared_w13=s.gate_up_proj,
                                 shared_w2=s.down_proj, shared_gate=s.shared_gate)
    assert torch.equal(y, y_ref)
    m.quantized = None
    torch.testing.assert_close(m(x), y, rtol=0.05, atol=2e-3)


def _ep_worker(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        cfg = make_cfg(route_norm=True)
        full = cfg.build(hidden_size=H)
        full.init_weights(11)
        ep = cfg.build(hidden_size=H, ep_group=dist.group.WORLD)
        ep.init_weights(11)
        # a per-expert Hugging Face checkpoint loads only the rank's experts
        sd = {"gate.weight": full.gate.weight, "shared_expert_gate.weight": full.shared_experts.shared_gate}
        for e in range(E):
            sd[f"experts.{e}.gate_proj.weight"] = full.experts.gate_up_proj[e, :I]
            sd[f"experts.{e}.up_proj.weight"] = full.experts.gate_up_proj[e, I:]
            sd[f"experts.{e}.down_proj.weight"] = full.experts.down_proj[e]
        sh = full.shared_experts
        for n, w in (("gate_proj", sh.gate_up_proj[:4]), ("up_proj", sh.gate_up_proj[4:]), ("down_proj", sh.down_proj)):
            sd[f"shared_expert.{n}.weight"] = w
        ep.init_weights(12)
        ep.load_hf_state_dict(sd)
        x = torch.randn(3 + rank, H, generator=torch.Generator().manual_seed(rank))
        torch.save({"range": ep.expert_range, "ep": ep(x), "full": full(x),
                    "slice_ok": torch.equal(ep.experts.gate_up_proj,
                                            full.experts.gate_up_proj[ep.expert_range[0]:ep.expert_range[1]])},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_expert_parallel_module_equals_single_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ep_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2)
    res = [torch.load(f"{tmp_path / 'res'}.{r}") for r in range(2)]
    assert [r["range"] for r in res] == [(0, E // 2), (E // 2, E)]
    for r in res:
        assert r["slice_ok"]
        torch.testing.assert_close(r["ep"], r["full"], rtol=1e-5, atol=1e-6)
