"""Router record/replay: exact replay, stable keys, checkpoint recomputation, static buffers, export/import."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import mojo_opset as mo
from mojo_opset import RouterReplay

H, E, I, K = 16, 8, 8, 2


def moe_cfg(**kw):
    return mo.MoE.Config(num_experts=E, experts=mo.GroupedExperts.Config(intermediate_size=I),
                         router=mo.Router.Config(top_k=K, **kw))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.mlp = moe_cfg(route_norm=True).build(hidden_size=H)

    def forward(self, h):
        return h + self.mlp(self.norm(h))


class Toy(nn.Module):
    """Two MoE blocks and optionally an MTP-like head with its own MoE, run first or last."""

    def __init__(self, mtp=False, mtp_first=False, ckpt=None):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.mtp = Block() if mtp else None
        self.mtp_first, self.ckpt = mtp_first, ckpt
        torch.manual_seed(0)
        for i, m in enumerate(self.modules()):
            if isinstance(m, mo.MoE):
                m.init_weights(100 + i)

    def _run(self, blk, h):
        if self.ckpt is None:
            return blk(h)
        return checkpoint(blk, h, use_reentrant=self.ckpt == "reentrant")

    def forward(self, x):
        h = x
        if self.mtp is not None and self.mtp_first:
            h = self._run(self.mtp, h)
        for blk in self.layers:
            h = self._run(blk, h)
        if self.mtp is not None and not self.mtp_first:
            h = self._run(self.mtp, h)
        return h


def random_ids(T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)


def moes(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, mo.MoE)}


def test_record_then_replay_is_bit_identical():
    model = Toy()
    x = torch.randn(2, 3, H)
    rr = RouterReplay(model)
    assert rr.layer_names == ["layers.0.mlp", "layers.1.mlp"]   # outermost routing layers only
    with rr.record():
        y_rec = model(x)
    rec = rr.export()
    assert set(rec) == {"layers.0.mlp", "layers.1.mlp"} and rec["layers.0.mlp"].shape == (6, K)
    assert rec["layers.0.mlp"].dtype == torch.int32
    trainer = copy.deepcopy(model)
    rt = RouterReplay(trainer)
    with rt.replay(rec):
        y_rep = trainer(x)
    assert torch.equal(y_rep, y_rec)
    for name, m in moes(trainer).items():
        assert torch.equal(m.last_topk_ids, rec[name])


def test_replay_forces_given_ids_and_keeps_router_gradient():
    model = Toy()
    x = torch.randn(6, H)
    ids = {"layers.0.mlp": random_ids(6, 1), "layers.1.mlp": random_ids(6, 2)}
    with RouterReplay(model).replay(ids):
        y = model(x)
    for name, m in moes(model).items():
        assert torch.equal(m.last_topk_ids, ids[name])
    y.sum().backward()
    assert all(m.gate.weight.grad.abs().sum() > 0 for m in moes(model).values())
    # the same as forcing by hand through the functional op
    blk = model.layers[0]
    h = blk.norm(x)
    want = x + mo.moe_forward(h, blk.mlp.gate.weight, blk.mlp.experts.gate_up_proj, blk.mlp.experts.down_proj, K,
                              route_norm=True, forced_expert_ids=ids["layers.0.mlp"])
    assert torch.equal(model.layers[0](x), model.layers[0](x))   # natural routing once the session ended
    with RouterReplay(model).replay({"layers.0.mlp": ids["layers.0.mlp"], "layers.1.mlp": ids["layers.1.mlp"]}):
        assert torch.equal(model.layers[0](x), want)


def test_keys_are_names_not_call_order():
    src = Toy(mtp=True, mtp_first=False)
    x = torch.randn(5, H)
    rr = RouterReplay(src)
    with rr.record():
        src(x)
    rec = rr.export()
    assert list(rec) == ["layers.0.mlp", "layers.1.mlp", "mtp.mlp"]
    # the trainer runs the MTP head first: by call order it would take layers.0's ids
    dst = Toy(mtp=True, mtp_first=True)
    dst.load_state_dict(src.state_dict())
    forced = {n: random_ids(5, i) for i, n in enumerate(rec)}
    with RouterReplay(dst).replay(forced):
        dst(x)
    for name, m in moes(dst).items():
        assert torch.equal(m.last_topk_ids, forced[name]), name


def test_missing_unknown_and_misshaped_ids_are_clear_errors():
    model = Toy(mtp=True)
    x = torch.randn(4, H)
    ids = {"layers.0.mlp": random_ids(4, 0), "layers.1.mlp": random_ids(4, 1)}
    rr = RouterReplay(model)
    with pytest.raises(KeyError, match="no replay ids for layer 'mtp.mlp'"):
        with rr.replay(ids):
            model(x)
    assert rr.mode is None   # the failed session ended
    with pytest.raises(KeyError, match="no attached layer is named"):
        rr.load({**ids, "model.layers.0.mlp": ids["layers.0.mlp"]})
    rr.load({**ids, "extra": ids["layers.0.mlp"]}, strict=False)
    with pytest.raises(ValueError, match="replay ids have shape"):
        with rr.replay({**ids, "mtp.mlp": random_ids(3, 2)}):
            model(x)
    with pytest.raises(TypeError, match="integer tensor"):
        rr.load({"layers.0.mlp": torch.zeros(4, K)})
    with pytest.raises(RuntimeError, match="nothing recorded"):
        RouterReplay(Toy()).export()


def test_layer_routed_twice_in_one_recording_is_an_error():
    model = Toy()
    rr = RouterReplay(model)
    with pytest.raises(RuntimeError, match="routed twice"):
        with rr.record():
            model(torch.randn(3, H))
            model(torch.randn(3, H))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_replay_holds_during_checkpoint_recompute(mode):
    x0 = torch.randn(6, H)
    ids = {"layers.0.mlp": random_ids(6, 3), "layers.1.mlp": random_ids(6, 4)}

    def run(ckpt, replay):
        model = Toy(ckpt=ckpt)
        x = x0.clone().requires_grad_(True)
        if replay:
            with RouterReplay(model).replay(ids):
                y = model(x)
        else:
            y = model(x)
        (y * torch.arange(H)).sum().backward()   # backward after the replay session ended
        return _grads(model), x.grad

    ref, ref_x = run(None, True)
    model = Toy(ckpt=mode)
    rr = RouterReplay(model)
    with rr.replay(ids):
        y = model(x0.clone().requires_grad_(True))
    assert len(rr._live) == 1       # the session lives in the graph of the forward awaiting backward
    y.sum().backward()
    del y
    assert len(rr._live) == 0       # and goes with it: nothing is left queued
    got, got_x = run(mode, True)
    natural, _ = run(mode, False)
    assert ref.keys() == got.keys()
    for n in ref:
        assert torch.equal(got[n], ref[n]), n
    assert torch.equal(got_x, ref_x)
    # the forced routing differs from the natural one, so the check above can fail
    assert any(not torch.equal(natural[n], ref[n]) for n in ref if "experts" in n)


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_record_session_recompute_uses_recorded_ids(mode):
    model = Toy(ckpt=mode)
    x = torch.randn(6, H, requires_grad=True)
    rr = RouterReplay(model)
    with rr.record():
        y = model(x)
    y.sum().backward()
    plain = Toy()
    x2 = x.detach().clone().requires_grad_(True)
    plain(x2).sum().backward()
    for n, g in _grads(plain).items():
        assert torch.equal(dict(model.named_parameters())[n].grad, g), n


def test_static_buffers_are_reused():
    model = Toy()
    rr = RouterReplay(model)
    bufs = rr.allocate_static(6)
    ptrs = {n: b.data_ptr() for n, b in bufs.items()}
    for seed in (0, 1):
        x = torch.randn(6, H, generator=torch.Generator().manual_seed(seed))
        with rr.record():
            model(x)
        for n, m in moes(model).items():
            b = rr.static_buffers[n]
            assert b.data_ptr() == ptrs[n] and b.shape == (6, K)   # copied into, never reallocated
            assert torch.equal(b, m.last_topk_ids)
            assert rr.recorded()[n] is bufs[n]
    exported = rr.export()
    assert all(exported[n].data_ptr() != ptrs[n] for n in exported)   # export copies
    with pytest.raises(RuntimeError, match="static"):
        with rr.record():
            model(torch.randn(5, H))


def test_export_import_dict_and_stacked():
    model = Toy(mtp=True)
    x = torch.randn(2, 4, H)
    rr = RouterReplay(model)
    with rr.record():
        y = model(x)
    stacked, names = rr.export_stacked()
    assert stacked.shape == (3, 8, K) and names == rr.layer_names
    assert RouterReplay.unstack(stacked, names).keys() == rr.export().keys()
    trainer = copy.deepcopy(model)
    rt = RouterReplay(trainer)
    rt.load(stacked, names)
    with rt.replay():
        assert torch.equal(trainer(x), y)
    with rt.replay(rr.export()):
        assert torch.equal(trainer(x), y)
    with pytest.raises(ValueError, match="distinct layer names"):
        RouterReplay.unstack(stacked, names[:2])
    with pytest.raises(ValueError, match="needs the layer names"):
        rt.load(stacked)


def test_standalone_router_and_detach():
    class R(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = mo.Router.Config(top_k=K).build(hidden_size=H, num_experts=E)

        def forward(self, x):
            return self.router(x)

    model = R()
    x = torch.randn(5, H)
    rr = RouterReplay(model)
    with rr.record():
        ids, _ = model(x)
    assert torch.equal(rr.export()["router"], ids)
    forced = random_ids(5, 9)
    with rr.replay({"router": forced}):
        assert torch.equal(model(x)[0], forced)
    rr.detach()
    assert torch.equal(model(x)[0], ids)
    with pytest.raises(ValueError, match="no routing layer"):
        RouterReplay(nn.Linear(2, 2))


@pytest.mark.gpu
def test_static_record_inside_cuda_graph():
    dev = torch.device("cuda")
    model = Toy().to(dev, torch.bfloat16).eval()
    for m in moes(model).values():
        m.config.backend = "torch"   # the reference path (torch._grouped_mm) captures without host sync
    rr = RouterReplay(model)
    bufs = rr.allocate_static(16)
    static_x = torch.zeros(16, H, device=dev, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():   # warm up off the capture stream
        for _ in range(2):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), rr.record():
        with torch.cuda.graph(graph):
            model(static_x)
    for seed in (1, 2):
        x = torch.randn(16, H, generator=torch.Generator().manual_seed(seed)).to(dev, torch.bfloat16)
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            model(x)   # eager, outside any session: natural routing
        for n, m in moes(model).items():
            assert torch.equal(bufs[n], m.last_topk_ids), (seed, n)
