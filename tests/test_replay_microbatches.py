"""Router replay with several micro-batches in flight (gradient accumulation, as RL trainers run it):
each recomputed forward routes with the ids of the very forward it recomputes, whatever the backward
order, with reentrant and non-reentrant checkpointing, nested checkpoints and activation offloading.
Gradients are compared with the same replay run without checkpointing."""
import copy
import itertools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import mojo_opset as mo
from mojo_opset import RouterReplay

H, E, I, K, T = 16, 8, 8, 2, 6
CKPTS = ["reentrant", "non_reentrant"]
# a reentrant checkpoint run under no_grad (an inner one during the outer forward, or a no-grad forward
# between micro-batches) warns that no input requires grad: expected here
pytestmark = pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")


class Block(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.mlp = mo.MoE.Config(num_experts=E, experts=mo.GroupedExperts.Config(intermediate_size=I),
                                 router=mo.Router.Config(top_k=K, route_norm=True),
                                 backend=backend).build(hidden_size=H)

    def forward(self, h):
        return h + self.mlp(self.norm(h))


class Net(nn.Module):
    """Two MoE blocks; ``ckpt`` checkpoints each block, ``outer`` also the whole stack (nested)."""

    def __init__(self, backend="torch"):
        super().__init__()
        self.blocks = nn.ModuleList([Block(backend), Block(backend)])
        for i, m in enumerate(self.modules()):
            if isinstance(m, mo.MoE):
                m.init_weights(100 + i)
        self.ckpt = self.outer = None

    def _run(self, mode, fn, h):
        return fn(h) if mode is None else checkpoint(fn, h, use_reentrant=mode == "reentrant")

    def _stack(self, h):
        for blk in self.blocks:
            h = self._run(self.ckpt, blk, h)
        return h

    def forward(self, x):
        return self._run(self.outer, self._stack, x)


def random_ids(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)


def batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(T, H, generator=g) for _ in range(n)]
    ids = [{f"blocks.{j}.mlp": random_ids(100 * i + j + seed) for j in range(2)} for i in range(n)]
    return xs, ids


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(base, xs, ids, *, ckpt=None, outer=None, order=None, no_grad_between=False, offload=False,
        x_grad=True):
    """Replay micro-batch i with ids[i] (each in its own session), then run the backwards in
    ``order`` (None: one backward of the sum).  Returns the parameter and input gradients."""
    model = copy.deepcopy(base)
    model.ckpt, model.outer = ckpt, outer
    rr = RouterReplay(model)
    xs = [x.clone().requires_grad_(x_grad) for x in xs]
    losses = []
    weight = torch.linspace(-1, 1, H)
    for i, (x, ids_i) in enumerate(zip(xs, ids)):
        with torch.autograd.graph.save_on_cpu() if offload else torch.enable_grad():
            with rr.replay(ids_i, clear_pending=False):
                losses.append((model(x) * weight * (i + 1)).sum())
        if no_grad_between:
            # a forward that is never backpropagated (e.g. an evaluation) between the micro-batches
            other = {n: random_ids(777 + j) for j, n in enumerate(ids_i)}
            with torch.no_grad(), rr.replay(other):
                model(torch.randn(T, H))
    if order is None:
        sum(losses).backward()
    else:
        for i in order:
            losses[i].backward()
    return grads(model), [x.grad for x in xs] if x_grad else []


def assert_same(got, ref):
    (g, gx), (r, rx) = got, ref
    assert g.keys() == r.keys()
    for n in r:
        torch.testing.assert_close(g[n], r[n], rtol=1e-5, atol=1e-6, msg=n)
    for a, b in zip(gx, rx):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_forced_routing_matters():
    """Guard for the tests below: replaying another micro-batch's ids changes the router gradient."""
    base = Net()
    xs, ids = batch(2)
    ref = run(base, xs, ids)
    swapped = run(base, xs, ids[::-1])
    assert not torch.allclose(ref[0]["blocks.0.mlp.gate.weight"], swapped[0]["blocks.0.mlp.gate.weight"])


@pytest.mark.parametrize("ckpt", CKPTS)
@pytest.mark.parametrize("n,order", [(2, None), (2, (1, 0)), (2, (0, 1)), (3, None), (3, (2, 0, 1)),
                                     (3, (1, 2, 0))])
def test_recompute_uses_its_own_forward_ids(ckpt, n, order):
    base = Net()
    xs, ids = batch(n, seed=n)
    assert_same(run(base, xs, ids, ckpt=ckpt, order=order), run(base, xs, ids))


@pytest.mark.parametrize("ckpt", CKPTS)
def test_no_grad_replayed_forward_in_between_leaves_nothing_behind(ckpt):
    base = Net()
    xs, ids = batch(3, seed=5)
    ref = run(base, xs, ids)
    assert_same(run(base, xs, ids, ckpt=ckpt, no_grad_between=True), ref)
    assert_same(run(base, xs, ids, ckpt=ckpt, no_grad_between=True, order=(2, 1, 0)), ref)


@pytest.mark.parametrize("outer,inner", [("reentrant", "reentrant"), ("non_reentrant", "non_reentrant"),
                                         ("reentrant", "non_reentrant"), ("non_reentrant", "reentrant"),
                                         ("reentrant", None), ("non_reentrant", None)])
def test_nested_and_whole_model_checkpoints(outer, inner):
    base = Net()
    xs, ids = batch(2, seed=7)
    assert_same(run(base, xs, ids, ckpt=inner, outer=outer, order=(1, 0)), run(base, xs, ids))


@pytest.mark.parametrize("ckpt", CKPTS + [None])
def test_activation_offloading(ckpt):
    base = Net()
    xs, ids = batch(2, seed=9)
    assert_same(run(base, xs, ids, ckpt=ckpt, offload=True, order=(1, 0)), run(base, xs, ids))


def test_layer_input_without_grad():
    """A checkpointed MoE whose input needs no gradient: its nodes hang off its parameters only."""
    moe = Net().blocks[0].mlp
    xs, ids = batch(2, seed=11)

    def go(ckpt, order):
        m = copy.deepcopy(moe)
        rr = RouterReplay(m)
        losses = []
        for x, i in zip(xs, ids):
            with rr.replay({"root": i["blocks.0.mlp"]}):
                y = m(x) if ckpt is None else checkpoint(m, x, use_reentrant=False)
            losses.append(y.square().sum())
        for i in order:
            losses[i].backward()
        return grads(m), []

    assert_same(go("non_reentrant", (1, 0)), go(None, (0, 1)))


@pytest.mark.parametrize("ckpt", CKPTS)
def test_recorded_and_natural_forwards_recompute_naturally(ckpt):
    """Micro-batches mixing a replayed, a recorded and a natural forward: each recomputation routes
    as its own forward did."""
    base = Net()
    xs, ids = batch(3, seed=13)

    def go(ckpt, order):
        model = copy.deepcopy(base)
        model.ckpt = ckpt
        rr = RouterReplay(model)
        x = [v.clone().requires_grad_(True) for v in xs]
        with rr.replay(ids[0]):
            l0 = model(x[0]).square().sum()
        with rr.record():
            l1 = model(x[1]).square().sum()
        l2 = model(x[2]).square().sum()
        for i in order:
            (l0, l1, l2)[i].backward()
        return grads(model), [v.grad for v in x]

    ref = go(None, (0, 1, 2))
    for order in itertools.permutations(range(3)):
        assert_same(go(ckpt, order), ref)


@pytest.mark.parametrize("backend", ["triton", "ttx"])
@pytest.mark.parametrize("ckpt", CKPTS)
def test_kernel_backends(backend, ckpt):
    if not mo.available_backends().get(backend, {}).get("available"):
        pytest.skip(f"backend {backend} unavailable")
    base = Net(backend)
    xs, ids = batch(2, seed=3)
    assert_same(run(base, xs, ids, ckpt=ckpt, order=(1, 0)), run(base, xs, ids))


def test_unidentifiable_recompute_is_an_error():
    """A layer run inside backward whose forward carries no tag, while replayed forwards await their
    backward: an error naming the layer, never another forward's ids."""
    base = Net()
    model = copy.deepcopy(base)
    model.ckpt = "non_reentrant"
    x = torch.randn(T, H, requires_grad=True)
    loss = model(x).sum()             # checkpointed before any RouterReplay is attached
    rr = RouterReplay(model)
    with rr.replay(batch(1)[1][0]):
        pending = model(torch.randn(T, H)).sum()
    with pytest.raises(RuntimeError, match="layer 'blocks.1.mlp' runs inside backward"):
        loss.backward()
    pending.backward()
