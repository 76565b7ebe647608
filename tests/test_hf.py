"""Hugging Face builders: each family's MoE block vs a naive per-token version of that family's code."""
import pytest
import torch
import torch.nn.functional as F

import mojo_opset as mo
from mojo_opset import hf

H, I, E, K, T = 16, 8, 8, 2, 7
PREFIX = "model.layers.1.mlp."


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.3


def per_expert_sd(names=("gate_proj", "up_proj", "down_proj"), n_experts=E, inter=I, seed=0):
    sd = {PREFIX + "gate.weight": rand(n_experts, H, seed=seed)}
    for e in range(n_experts):
        g, u, d = names
        sd[f"{PREFIX}experts.{e}.{g}.weight"] = rand(inter, H, seed=seed + 3 * e + 1)
        sd[f"{PREFIX}experts.{e}.{u}.weight"] = rand(inter, H, seed=seed + 3 * e + 2)
        sd[f"{PREFIX}experts.{e}.{d}.weight"] = rand(H, inter, seed=seed + 3 * e + 3)
    return sd


def add_shared(sd, base, inter, seed=500):
    sd[f"{PREFIX}{base}.gate_proj.weight"] = rand(inter, H, seed=seed)
    sd[f"{PREFIX}{base}.up_proj.weight"] = rand(inter, H, seed=seed + 1)
    sd[f"{PREFIX}{base}.down_proj.weight"] = rand(H, inter, seed=seed + 2)


def mlp(sd, base, x, names=("gate_proj", "up_proj", "down_proj")):
    g, u, d = (sd[f"{PREFIX}{base}.{n}.weight"] for n in names)
    return d @ (F.silu(g @ x) * (u @ x))


def naive_block(sd, x, *, names, choose, weights_of, shared=None):
    """Per-token MoE: choose(x_t) -> ids; weights_of(x_t, ids) -> weights; sum of weighted experts."""
    out = torch.zeros_like(x)
    all_ids = []
    for t in range(x.shape[0]):
        ids = choose(x[t])
        w = weights_of(x[t], ids)
        for j, e in enumerate(ids):
            out[t] += w[j] * mlp(sd, f"experts.{e}", x[t], names)
        if shared is not None:
            out[t] += shared(x[t])
        all_ids.append(sorted(ids))
    return out, all_ids


def check(moe, sd, naive_out, naive_ids, x):
    moe.load_hf_state_dict(sd, PREFIX)
    y, info = moe(x, return_router_info=True)
    assert [sorted(r) for r in info["topk_ids"].tolist()] == naive_ids
    torch.testing.assert_close(y, naive_out, rtol=1e-5, atol=1e-5)


def x_in():
    return torch.randn(T, H, generator=torch.Generator().manual_seed(99))


def softmax_topk(Wg, norm: bool):
    """The naive softmax top-K routing of Mixtral/Qwen: (choose, weights_of) for naive_block."""
    def choose(xt):
        return torch.softmax(Wg @ xt, -1).topk(K).indices.tolist()

    def weights_of(xt, ids):
        p = torch.softmax(Wg @ xt, -1)[ids]
        return p / p.sum() if norm else p

    return choose, weights_of


def test_mixtral():
    cfg = {"model_type": "mixtral", "hidden_size": H, "intermediate_size": I, "num_local_experts": E,
           "num_experts_per_tok": K, "hidden_act": "silu"}
    moe = mo.MoE.from_hf_config(cfg, layer_idx=1)
    assert moe.gate.config.router_dtype is None and moe.shared_experts is None
    sd = per_expert_sd(("w1", "w3", "w2"))
    choose, weights_of = softmax_topk(sd[PREFIX + "gate.weight"], norm=True)

    x = x_in()
    out, ids = naive_block(sd, x, names=("w1", "w3", "w2"), choose=choose, weights_of=weights_of)
    check(moe, sd, out, ids, x)


@pytest.mark.parametrize("norm", [False, True])
def test_qwen2_moe(norm):
    cfg = {"model_type": "qwen2_moe", "hidden_size": H, "moe_intermediate_size": I, "num_experts": E,
           "num_experts_per_tok": K, "shared_expert_intermediate_size": 12, "norm_topk_prob": norm}
    moe = mo.MoE.from_hf_config(cfg, layer_idx=1)
    assert moe.gate.config.route_norm is norm and moe.shared_experts.shared_gate is not None
    sd = per_expert_sd()
    add_shared(sd, "shared_expert", 12)
    sd[PREFIX + "shared_expert_gate.weight"] = rand(1, H, seed=77)
    choose, weights_of = softmax_topk(sd[PREFIX + "gate.weight"], norm)

    def shared(xt):
        return torch.sigmoid(sd[PREFIX + "shared_expert_gate.weight"] @ xt) * mlp(sd, "shared_expert", xt)

    x = x_in()
    out, ids = naive_block(sd, x, names=("gate_proj", "up_proj", "down_proj"), choose=choose,
                           weights_of=weights_of, shared=shared)
    check(moe, sd, out, ids, x)


def test_qwen3_moe_and_sparse_layer_rule():
    cfg = {"model_type": "qwen3_moe", "hidden_size": H, "moe_intermediate_size": I, "num_experts": E,
           "num_experts_per_tok": K, "norm_topk_prob": True, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert [hf.is_moe_layer(cfg, i) for i in range(6)] == [False, True, False, False, False, True]
    with pytest.raises(ValueError, match="layer 2 of this qwen3_moe config is a dense MLP"):
        mo.MoE.from_hf_config(cfg, layer_idx=2)
    moe = mo.MoE.from_hf_config(cfg, layer_idx=1)
    assert moe.shared_experts is None and moe.gate.config.route_norm
    sd = per_expert_sd()
    choose, weights_of = softmax_topk(sd[PREFIX + "gate.weight"], norm=True)

    x = x_in()
    out, ids = naive_block(sd, x, names=("gate_proj", "up_proj", "down_proj"), choose=choose,
                           weights_of=weights_of)
    check(moe, sd, out, ids, x)


def deepseek_v2_gate(Wg, xt, method, n_group, topk_group):
    scores = torch.softmax(Wg.float() @ xt.float(), -1)
    if method == "group_limited_greedy":
        group_scores = scores.view(n_group, -1).max(-1).values
        keep = group_scores.topk(topk_group).indices
        mask = torch.zeros(n_group, dtype=torch.bool)
        mask[keep] = True
        tmp = scores.masked_fill(~mask.repeat_interleave(E // n_group), 0.0)
        return scores, tmp.topk(K).indices.tolist()
    return scores, scores.topk(K).indices.tolist()


@pytest.mark.parametrize("method,norm", [("greedy", False), ("group_limited_greedy", False),
                                         ("group_limited_greedy", True)])
def test_deepseek_v2(method, norm):
    cfg = {"model_type": "deepseek_v2", "hidden_size": H, "moe_intermediate_size": I, "n_routed_experts": E,
           "num_experts_per_tok": K, "n_shared_experts": 2, "routed_scaling_factor": 16.0, "topk_method": method,
           "n_group": 4, "topk_group": 2, "norm_topk_prob": norm, "first_k_dense_replace": 1}
    assert [hf.is_moe_layer(cfg, i) for i in range(3)] == [False, True, True]
    moe = mo.MoE.from_hf_config(cfg, layer_idx=1)
    assert moe.gate.config.router_dtype == torch.float32
    sd = per_expert_sd()
    add_shared(sd, "shared_experts", 2 * I)
    Wg = sd[PREFIX + "gate.weight"]

    def choose(xt):
        return deepseek_v2_gate(Wg, xt, method, 4, 2)[1]

    def weights_of(xt, ids):
        w = deepseek_v2_gate(Wg, xt, method, 4, 2)[0][ids]
        return w / (w.sum() + 1e-20) if norm else w * 16.0

    x = x_in()
    out, ids = naive_block(sd, x, names=("gate_proj", "up_proj", "down_proj"), choose=choose,
                           weights_of=weights_of, shared=lambda xt: mlp(sd, "shared_experts", xt))
    check(moe, sd, out, ids, x)


def test_deepseek_v3():
    cfg = {"model_type": "deepseek_v3", "hidden_size": H, "moe_intermediate_size": I, "n_routed_experts": E,
           "num_experts_per_tok": K, "n_shared_experts": 1, "routed_scaling_factor": 2.5, "n_group": 4,
           "topk_group": 2, "norm_topk_prob": True, "first_k_dense_replace": 1, "topk_method": "noaux_tc"}
    moe = mo.MoE.from_hf_config(cfg, layer_idx=1)
    rc = moe.gate.config
    assert (rc.router_dtype, rc.score_func, rc.group_score) == (torch.float32, "sigmoid", "top2_sum")
    assert rc.expert_bias and (rc.num_expert_groups, rc.num_limited_groups) == (4, 2)
    sd = per_expert_sd()
    add_shared(sd, "shared_experts", I)
    # positive biases: the reference masks excluded groups with 0.0, which equals exclusion when choices are >= 0
    bias = torch.rand(E, generator=torch.Generator().manual_seed(5)) * 0.2
    sd[PREFIX + "gate.e_score_correction_bias"] = bias
    Wg = sd[PREFIX + "gate.weight"]

    def choose(xt):
        s = torch.sigmoid(Wg.float() @ xt.float())
        c = s + bias
        gs = c.view(4, -1).topk(2, -1).values.sum(-1)
        keep = gs.topk(2).indices
        mask = torch.zeros(4, dtype=torch.bool)
        mask[keep] = True
        return c.masked_fill(~mask.repeat_interleave(E // 4), 0.0).topk(K).indices.tolist()

    def weights_of(xt, ids):
        w = torch.sigmoid(Wg.float() @ xt.float())[ids]
        return w / (w.sum() + 1e-20) * 2.5

    x = x_in()
    out, ids = naive_block(sd, x, names=("gate_proj", "up_proj", "down_proj"), choose=choose,
                           weights_of=weights_of, shared=lambda xt: mlp(sd, "shared_experts", xt))
    check(moe, sd, out, ids, x)
    assert torch.equal(moe.gate.expert_bias, bias)


def test_fused_checkpoint_loads_the_same_parameters():
    cfg = {"model_type": "qwen3_moe", "hidden_size": H, "moe_intermediate_size": I, "num_experts": E,
           "num_experts_per_tok": K}
    sd = per_expert_sd()
    fused = {PREFIX + "gate.weight": sd[PREFIX + "gate.weight"],
             PREFIX + "experts.gate_up_proj": torch.stack([
                 torch.cat([sd[f"{PREFIX}experts.{e}.gate_proj.weight"], sd[f"{PREFIX}experts.{e}.up_proj.weight"]])
                 for e in range(E)]),
             PREFIX + "experts.down_proj": torch.stack([sd[f"{PREFIX}experts.{e}.down_proj.weight"] for e in range(E)])}
    a, b = mo.MoE.from_hf_config(cfg), mo.MoE.from_hf_config(cfg)
    a.load_hf_state_dict(sd, PREFIX)
    b.load_hf_state_dict(fused, PREFIX.rstrip("."))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    # the fused layout is the state dict of the module itself
    assert torch.equal(b.state_dict()["experts.gate_up_proj"], fused[PREFIX + "experts.gate_up_proj"])


def test_build_dtype_and_overrides():
    cfg = {"model_type": "mixtral", "hidden_size": H, "intermediate_size": I, "num_local_experts": E,
           "num_experts_per_tok": K}
    moe = hf.build_moe(cfg, dtype=torch.bfloat16, backend="torch", aux_loss="switch", aux_loss_coeff=0.01)
    assert moe.gate.weight.dtype == torch.bfloat16 and moe.config.backend == "torch"
    moe.load_hf_state_dict(per_expert_sd(("w1", "w3", "w2")), PREFIX)
    y = moe(x_in().to(torch.bfloat16))
    assert y.dtype == torch.bfloat16


class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_config_object_and_errors():
    obj = _Obj(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E,
               num_experts_per_tok=K)
    assert mo.MoE.from_hf_config(obj).num_experts == E
    with pytest.raises(ValueError, match="unsupported MoE family 'llama'"):
        mo.MoE.from_hf_config({"model_type": "llama"})
    with pytest.raises(ValueError, match="no model_type"):
        mo.MoE.from_hf_config({"hidden_size": H})
    with pytest.raises(KeyError, match="no 'num_experts_per_tok'"):
        mo.MoE.from_hf_config({"model_type": "mixtral", "hidden_size": H, "intermediate_size": I,
                               "num_local_experts": E})
    with pytest.raises(ValueError, match="SwiGLU"):
        mo.MoE.from_hf_config({"model_type": "qwen3_moe", "hidden_size": H, "moe_intermediate_size": I,
                               "num_experts": E, "num_experts_per_tok": K, "hidden_act": "gelu"})
    moe = mo.MoE.from_hf_config(obj)
    sd = per_expert_sd()
    with pytest.raises(KeyError, match="no tensor under prefix"):
        moe.load_hf_state_dict(sd, "model.layers.2.mlp")
    bad = dict(sd)
    del bad[PREFIX + "experts.3.up_proj.weight"]
    with pytest.raises(KeyError, match="experts.3.up_proj.weight"):
        moe.load_hf_state_dict(bad, PREFIX)
    extra = dict(sd, **{PREFIX + "shared_expert_gate.weight": torch.zeros(1, H)})
    with pytest.raises(KeyError, match="does not use"):
        moe.load_hf_state_dict(extra, PREFIX)
    moe.load_hf_state_dict(extra, PREFIX, strict=False)
    wrong = dict(sd, **{PREFIX + "gate.weight": torch.zeros(E, H + 1)})
    with pytest.raises(ValueError, match="gate.weight.*shape"):
        moe.load_hf_state_dict(wrong, PREFIX)
