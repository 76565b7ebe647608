"""The original mojo_opset's operator classes (mojo_opset.compat): layouts, state dicts, forwards against
this library's functional ops and naive computations, backend names, errors."""
import pytest
import torch
import torch.nn.functional as F

import mojo_opset as mo
from mojo_opset import compat
from naive_moe import naive_moe

NAMES = ("MojoMoE", "MojoQuantMoE", "MojoMoEGating", "MojoMoEDispatch", "MojoExperts", "MojoQuantExperts",
         "MojoMoECombine")


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("MOJO_BACKEND", raising=False)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _original_moe_state(E, H, I, seed=0, dtype=torch.float32):
    """A state dict in the original's layout, built by hand (router [H, E] fp32)."""
    g = _gen(seed)
    return {"gating.gate_weight": torch.randn(H, E, generator=g) * 0.5,
            "experts.up_proj_weight": (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype),
            "experts.down_proj_weight": (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)}


def _natural(x, gate_weight_he, K):
    """Softmax top-k with renormalised weights, naively (ties to the lower id as sort is stable)."""
    probs = torch.softmax(x.float() @ gate_weight_he.float(), dim=-1)
    ids = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :K]
    w = probs.gather(1, ids)
    return ids, probs, w / w.sum(-1, keepdim=True)


def test_top_level_names_are_the_compat_classes():
    for n in NAMES:
        assert getattr(mo, n) is getattr(compat, n) and n in mo.__all__


# --------------------------------------------------------------------------- gating

def test_gating_layout_forward_and_fp32_weight():
    H, E, K, T = 16, 6, 2, 9
    gate = mo.MojoMoEGating(hidden_size=H, num_experts=E, top_k=K)
    assert type(gate) is mo.MojoMoEGating and gate.backend is None
    assert list(gate.state_dict()) == ["gate_weight"]
    assert gate.gate_weight.shape == (H, E) and gate.gate_weight.dtype == torch.float32
    gate.to(torch.bfloat16)                       # the router weight stays fp32, as the original's loaders force
    assert gate.gate_weight.dtype == torch.float32
    w = torch.randn(H, E, generator=_gen(1))
    gate.load_state_dict({"gate_weight": w})
    x = torch.randn(T, H, generator=_gen(2), dtype=torch.bfloat16)
    ids, gates = gate(x)
    assert ids.dtype == torch.int32 and gates.dtype == torch.float32 and ids.shape == gates.shape == (T, K)
    want_ids, _, want_w = _natural(x, w, K)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(gates, want_w, atol=1e-6, rtol=1e-6)
    ref_ids, ref_w = mo.moe_gating(x, w.t(), K, route_norm=True)
    assert torch.equal(ids, ref_ids) and torch.equal(gates, ref_w)
    assert torch.equal(gate.last_topk_ids, ids)


def test_gating_replay_full_and_partial():
    H, E, K, T = 8, 6, 3, 5
    gate = mo.MojoMoEGating(H, E, K)
    w = torch.randn(H, E, generator=_gen(3))
    gate.load_state_dict({"gate_weight": w})
    x = torch.randn(T, H, generator=_gen(4))
    nat, probs, _ = _natural(x, w, K)
    forced = torch.stack([torch.randperm(E, generator=_gen(10 + t))[:K] for t in range(T)])
    ids, gates = gate(x, forced_expert_ids=forced)
    assert torch.equal(ids.long(), forced)
    want = probs.gather(1, forced)
    torch.testing.assert_close(gates, want / want.sum(-1, keepdim=True))
    # -1 keeps the natural choice: the -1 slots take, in order, the best experts not forced in the row
    partial = forced.clone()
    partial[:, 1] = -1
    partial[0] = -1
    ids, gates = gate(x, forced_expert_ids=partial)
    for t in range(T):
        fixed = {int(e) for e in partial[t] if e >= 0}
        fill = iter(e for e in torch.sort(probs[t], descending=True, stable=True).indices.tolist() if e not in fixed)
        expect = [int(e) if e >= 0 else next(fill) for e in partial[t]]
        assert ids[t].tolist() == expect, t
    want = probs.gather(1, ids.long())
    torch.testing.assert_close(gates, want / want.sum(-1, keepdim=True))
    # a masked recording (forced ids equal to the natural ones at their slots): the original's rule
    # "slot j keeps natural[j]" gives the same ids
    masked = torch.where(torch.rand(T, K, generator=_gen(5)) < 0.5, nat, torch.full_like(nat, -1))
    ids, _ = gate(x, forced_expert_ids=masked)
    assert torch.equal(ids.long(), torch.where(masked >= 0, masked, nat))


def test_gating_bad_forced_ids_name_the_argument():
    gate = mo.MojoMoEGating(8, 4, 2)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="forced_expert_ids"):
        gate(x, forced_expert_ids=torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="forced_expert_ids"):
        gate(x, forced_expert_ids=torch.tensor([[0, 4], [0, 1], [1, 2]]))


# --------------------------------------------------------------------------- dispatch / combine

def test_dispatch_against_permute_and_bucket_sets():
    T, H, E, K = 7, 5, 4, 2
    x = torch.randn(T, H, generator=_gen(6))
    ids = torch.stack([torch.randperm(E, generator=_gen(20 + t))[:K] for t in range(T)]).to(torch.int32)
    gates = torch.rand(T, K, generator=_gen(7))
    disp = mo.MojoMoEDispatch(num_experts=E)
    rows, counts, sorted_gates, tok = disp(x, gates, ids)
    assert counts.dtype == tok.dtype == torch.int32 and sorted_gates.dtype == torch.float32
    assert sorted_gates.shape == (T * K, 1) and rows.shape == (T * K, H)
    assert torch.equal(counts.long(), torch.bincount(ids.reshape(-1).long(), minlength=E))
    assert torch.equal(rows, x[tok.long()])
    start = 0
    for e, n in enumerate(counts.tolist()):     # every bucket row routes to e with its slot's gate
        t = tok[start:start + n].long()
        assert t.tolist() == sorted(t.tolist())           # stable: by token inside a bucket
        slot = (ids[t] == e).long().argmax(1)
        assert bool((ids[t, slot] == e).all())
        assert torch.equal(sorted_gates[start:start + n, 0], gates[t, slot])
        start += n
    px, c2, _, row_src, _ = mo.moe_permute(x, ids, E)
    assert torch.equal(px, rows) and torch.equal(c2, counts) and torch.equal(row_src // K, tok)


@pytest.mark.parametrize("multiply_by_gates", [True, False])
def test_combine_any_number_of_rows_per_token(multiply_by_gates):
    T, H, R = 6, 4, 11
    g = _gen(8)
    tok = torch.tensor([3, 0, 3, 5, 3, 0, 1, 5, 5, 5, 1], dtype=torch.int32)     # token 2 and 4: no rows
    rows = torch.randn(R, H, generator=g, dtype=torch.float16)
    gates = torch.rand(R, 1, generator=g)
    comb = mo.MojoMoECombine(multiply_by_gates=multiply_by_gates)
    buf = torch.full((T, H), 7.0, dtype=torch.float16)     # its values are not read, as in the original
    out = comb(buf, rows, gates, tok)
    want = torch.zeros(T, H).index_add_(0, tok.long(), rows.float() * (gates if multiply_by_gates else 1.0))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, want.half(), atol=1e-3, rtol=1e-3)
    assert torch.equal(out[2], torch.zeros(H, dtype=torch.float16))
    assert comb(buf, rows[:0], gates[:0], tok[:0]).abs().sum() == 0
    with pytest.raises(ValueError, match="token_indices"):
        comb(buf, rows, gates, tok + 1)
    with pytest.raises(ValueError, match="sorted_gates"):
        comb(buf, rows, gates[:3], tok)


# --------------------------------------------------------------------------- experts

def test_experts_layout_and_forward():
    E, H, I = 3, 8, 6
    ex = mo.MojoExperts(num_experts=E, hidden_size=H, intermediate_size=I)
    sd = ex.state_dict()
    assert list(sd) == ["up_proj_weight", "down_proj_weight"]
    assert sd["up_proj_weight"].shape == (E, 2 * I, H) and sd["down_proj_weight"].shape == (E, H, I)
    g = _gen(9)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) * 0.3, torch.randn(E, H, I, generator=g) * 0.3
    ex.load_state_dict({"up_proj_weight": w13, "down_proj_weight": w2})
    counts = torch.tensor([2, 0, 3], dtype=torch.int32)
    xs = torch.randn(5, H, generator=g)
    y = ex(xs, counts)
    assert torch.equal(y, mo.moe_experts(xs, torch.cumsum(counts, 0).int(), w13, w2))
    expert = [0, 0, 2, 2, 2]                        # naive: gate rows then up rows
    for r, e in enumerate(expert):
        h = w13[e] @ xs[r]
        want = w2[e] @ (F.silu(h[:I]) * h[I:])
        torch.testing.assert_close(y[r], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        ex(xs, torch.tensor([5, 0], dtype=torch.int32))


# --------------------------------------------------------------------------- MoE

def test_moe_loads_the_original_state_dict_and_matches_naive():
    E, K, H, I, T = 6, 2, 16, 8, 10
    moe = mo.MojoMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I)
    state = _original_moe_state(E, H, I, seed=11)
    assert {k: tuple(v.shape) for k, v in moe.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    moe.load_state_dict(state)                              # strict: the keys and shapes are the original's
    x = torch.randn(T, H, generator=_gen(12))
    y = moe(x)
    y_naive, ids, _w = naive_moe(x, state["gating.gate_weight"].t(), state["experts.up_proj_weight"],
                                 state["experts.down_proj_weight"], K, route_norm=True)
    torch.testing.assert_close(y, y_naive, atol=1e-5, rtol=1e-5)
    assert torch.equal(moe.last_topk_ids.long(), ids)
    assert torch.equal(y, mo.moe_forward(x, state["gating.gate_weight"].t(), state["experts.up_proj_weight"],
                                         state["experts.down_proj_weight"], K, route_norm=True))
    # the state dict round-trips into a fresh layer
    other = mo.MojoMoE(E, K, H, I)
    other.load_state_dict(moe.state_dict())
    assert torch.equal(other(x), y)


def test_side_by_side_calls_of_the_migration_guide():
    """docs/migrating.md: each original call equals its functional counterpart; an original checkpoint
    moves into mo.MoE with one transpose."""
    E, K, H, I, T = 5, 2, 16, 8, 7
    sd = _original_moe_state(E, H, I, seed=17)
    W, w13, w2 = sd["gating.gate_weight"], sd["experts.up_proj_weight"], sd["experts.down_proj_weight"]
    x = torch.randn(T, H, generator=_gen(18))
    moe = mo.MojoMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I)
    moe.load_state_dict(sd)
    y = moe(x)
    ids, gates = moe.gating(x)
    assert [torch.equal(a, b) for a, b in zip((ids, gates), mo.moe_gating(x, W.t(), K, route_norm=True))] == [1, 1]
    rows, tpe, sorted_gates, token_indices = moe.dispatch(x, gates, ids)
    rows2, tpe2, _ends, row_src, pair_row = mo.moe_permute(x, ids, E)
    assert torch.equal(rows, rows2) and torch.equal(tpe, tpe2) and torch.equal(token_indices, row_src // K)
    assert torch.equal(sorted_gates[:, 0], gates.reshape(-1)[row_src.long()])
    ey = moe.experts(rows, tpe)
    assert torch.equal(ey, mo.moe_experts(rows, tpe.cumsum(0).int(), w13, w2))
    out = moe.combine(torch.zeros_like(x), ey, sorted_gates, token_indices)
    torch.testing.assert_close(out, mo.moe_combine(ey, pair_row, gates), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, y, atol=1e-6, rtol=1e-6)
    native = mo.MoE.Config(num_experts=E, router=mo.Router.Config(top_k=K, route_norm=True),
                           experts=mo.GroupedExperts.Config(intermediate_size=I)).build(hidden_size=H)
    native.load_state_dict({"gate.weight": sd["gating.gate_weight"].t(),
                            "experts.gate_up_proj": sd["experts.up_proj_weight"],
                            "experts.down_proj": sd["experts.down_proj_weight"]})
    # the same math; the router GEMM reads [E, H] contiguous here and [H, E] there (rounding order)
    torch.testing.assert_close(native(x), y, atol=1e-6, rtol=1e-6)


def test_moe_replay_and_router_replay():
    E, K, H, I, T = 5, 2, 8, 4, 6
    moe = mo.MojoMoE(E, K, H, I)
    moe.load_state_dict(_original_moe_state(E, H, I, seed=13))
    x = torch.randn(T, H, generator=_gen(14))
    y = moe(x)
    ids = moe.last_topk_ids.clone()
    assert torch.equal(moe(x, forced_expert_ids=ids), y)
    partial = ids.clone().long()
    partial[::2, 1] = -1                                   # masked recording: same routing
    assert torch.equal(moe(x, forced_expert_ids=partial), y)
    # RouterReplay keys the layer by its module name and drives forced_expert_ids
    model = torch.nn.ModuleDict({"layer0": moe})
    rr = mo.RouterReplay(model)
    assert rr.layer_names == ["layer0"]
    with rr.record():
        model["layer0"](x)
    rec = rr.export()
    assert torch.equal(rec["layer0"], ids)
    other = torch.roll(ids, 1, dims=0)
    with rr.replay({"layer0": other}):
        y2 = model["layer0"](x)
    assert torch.equal(moe.last_topk_ids, other) and not torch.equal(y2, y)


def test_router_replay_of_partial_ids_with_checkpointing():
    E, K, H, I, T = 6, 3, 8, 4, 5
    moe = mo.MojoMoE(E, K, H, I)
    moe.load_state_dict(_original_moe_state(E, H, I, seed=15))
    x = torch.randn(T, H, generator=_gen(16))
    with torch.no_grad():
        natural = moe(x)
        nat_ids = moe.last_topk_ids.clone()
    partial = torch.roll(nat_ids, 1, dims=0).long()
    partial[:, 1:] = -1                                    # slot 0 replayed, slots 1-2 keep the natural choice
    rr = mo.RouterReplay(torch.nn.ModuleDict({"moe": moe}))

    def run(checkpointed):
        xr = x.clone().requires_grad_(True)
        moe.zero_grad()
        with rr.replay({"moe": partial}):
            y = torch.utils.checkpoint.checkpoint(moe, xr, use_reentrant=False) if checkpointed else moe(xr)
        y.square().sum().backward()
        return y.detach(), moe.last_topk_ids.clone(), xr.grad, moe.gating.gate_weight.grad.clone()

    y, ids, gx, gw = run(False)
    assert torch.equal(ids[:, 0].long(), partial[:, 0]) and not torch.equal(y, natural)
    for t in range(T):                                    # the free slots hold the best remaining experts
        assert len(set(ids[t].tolist())) == K
    y2, ids2, gx2, gw2 = run(True)                         # recomputation in backward routes the same way
    assert torch.equal(y2, y) and torch.equal(ids2, ids) and torch.equal(gx2, gx) and torch.equal(gw2, gw)
    with rr.record():                                      # and a recording holds the resolved ids
        with torch.no_grad():
            moe(x, forced_expert_ids=partial)
    assert torch.equal(rr.export()["moe"], ids)


def test_moe_dtype_arguments_keep_the_router_fp32():
    moe = mo.MojoMoE(4, 2, 8, 4, dtype=torch.bfloat16)
    assert moe.gating.gate_weight.dtype == torch.float32
    assert moe.experts.up_proj_weight.dtype == torch.bfloat16
    moe.to(torch.float16)
    assert moe.gating.gate_weight.dtype == torch.float32 and moe.experts.down_proj_weight.dtype == torch.float16
    moe.gating.gate_weight.data = moe.gating.gate_weight.data.float()     # the original tests' re-cast is harmless
    assert moe(torch.randn(3, 8, dtype=torch.float16)).dtype == torch.float16


def test_moe_ep_layout_attributes():
    # 10 experts over 4 ranks: 3, 3, 2, 2 (the first E % W ranks one more), as in the original
    spans = [(mo.MojoMoE(10, 2, 8, 4, ep_size=4, ep_rank=r).ep_start,
              mo.MojoMoE(10, 2, 8, 4, ep_size=4, ep_rank=r).ep_end) for r in range(4)]
    assert spans == [(0, 3), (3, 6), (6, 8), (8, 10)]
    m = mo.MojoMoE(10, 2, 8, 4, ep_size=4, ep_rank=2, dp_input=True)
    assert m.num_experts_local == 2 and m.experts.up_proj_weight.shape[0] == 2
    assert m.gating.gate_weight.shape == (8, 10)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        m(torch.randn(2, 8))


def test_constructor_errors_name_the_argument():
    with pytest.raises(NotImplementedError, match="activation"):
        mo.MojoMoE(4, 2, 8, 4, activation="gelu")
    with pytest.raises(ValueError, match="intermediate_size"):
        mo.MojoMoE(4, 2, 8)
    with pytest.raises(ValueError, match="ep_rank"):
        mo.MojoMoE(4, 2, 8, 4, ep_size=2, ep_rank=2)
    with pytest.raises(ValueError, match="top_k"):
        mo.MojoMoEGating(8, 4, 5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        mo.MojoExperts(4, 8, 4, ffn_hidden_size=3)
    with pytest.raises(TypeError, match="num_experts"):
        mo.MojoMoEDispatch(num_experts=2.0)


# --------------------------------------------------------------------------- backend names

def test_backend_names_resolve_through_the_registry(monkeypatch):
    reg = mo.MojoMoE._registry
    assert reg.get(None) is mo.MojoMoE and reg.get_core_op_cls() is mo.MojoMoE
    torch_cls = reg.get("torch")
    assert torch_cls.__name__ == "TorchMoE" and torch_cls._backend == "torch"
    assert reg.get("TORCH") is torch_cls and reg.get(" Torch ") is torch_cls
    assert mo.MojoMoE.get_backend_impl("torch", strict=True) is torch_cls
    assert mo.MojoMoE.get_registered_backends()[-1] == "torch"
    monkeypatch.setenv("MOJO_BACKEND", "Torch")            # read at construction, as in the original
    m = mo.MojoMoE(4, 2, 8, 4)
    assert type(m) is torch_cls and m.backend == "torch"
    assert m.gating.backend == m.experts.backend == "torch" and type(m.gating).__name__ == "TorchMoEGating"
    monkeypatch.setenv("MOJO_BACKEND", "no_such_backend")    # pinned: later changes do not reach it
    m(torch.randn(3, 8))
    assert mo.last_served("moe_forward")["backend"] == "torch"
    with pytest.raises(mo.BackendError, match="no_such_backend"):
        mo.MojoMoE(4, 2, 8, 4)


@pytest.mark.parametrize("name", ["ixformer", "IXFORMER", "torch_npu", "TORCH_NPU"])
def test_original_backend_names_unavailable_here_say_why(name):
    if mo.available_backends().get("npu", {}).get("available") and "npu" in name.lower():
        pytest.skip("an Ascend NPU is present")
    with pytest.raises(mo.BackendError) as exc:
        mo.MojoMoEGating._registry.get(name)
    msg = str(exc.value).lower()
    assert "unavailable" in msg and ("ixformer" in msg or "npu" in msg)


# --------------------------------------------------------------------------- environment variables

def test_original_environment_variables_are_mapped_and_documented(monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("MOJO_RUN_MODE", "COMPILE")
    monkeypatch.setenv("MOJO_DETERMINISTIC", "1")
    monkeypatch.delenv("MOJO_DEBUG", raising=False)
    rep = compat.original_env_settings()
    assert rep["MOJO_RUN_MODE"] == {"value": "COMPILE", "equivalent": None, "note": compat.ENV_VARS["MOJO_RUN_MODE"][1]}
    assert rep["MOJO_DETERMINISTIC"]["equivalent"] == "MOJO_DETERMINISTIC" and "MOJO_DEBUG" not in rep
    assert compat.original_env_settings({"MOJO_BACKEND": "torch_npu"})["MOJO_BACKEND"]["equivalent"] == "MOJO_BACKEND"
    guide = (Path(__file__).parent.parent / "docs" / "migrating.md").read_text()
    missing = [name for name in compat.ENV_VARS if f"`{name}`" not in guide]
    assert not missing, f"not in docs/migrating.md: {missing}"
