"""Property-based fuzzing of the nn.Module forms and of router replay across micro-batches.

Properties: ``mo.MoE`` equals the functional ``moe_forward`` bit for bit on every backend, and
``GroupedExperts`` the torch reference's experts on the same routing; ``GroupedExperts`` rejects bad
ids (float, out of [0, E), negative, wrong shape) with an error naming ``topk_ids``; a sequence of
micro-batches, each replayed with its own ids (or recorded, or natural), with or without a no-grad
replayed forward in between, checkpointed (reentrant, non-reentrant, nested) or offloaded, then
backpropagated in any order, gives the gradients of the same sequence without checkpointing.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import mojo_opset as mo

from .cases import DEVICE, LONG, Case, ReplayCase, build, cases, replay_cases
from .checks import assert_close_rows
from .record import recorded
from .test_fuzz_backends import KERNEL_BACKENDS

ALL_BACKENDS = ["torch"] + [b for b in KERNEL_BACKENDS if b != "torch"]
# a reentrant checkpoint run under no_grad (an inner one during the outer forward, or a no-grad forward
# between micro-batches) warns that no input requires grad: expected here
pytestmark = pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")


def module_for(case: Case, backend: str, tensors) -> mo.MoE:
    """An ``mo.MoE`` holding the case's weights and routing options."""
    x, gw, w13, w2, kw = tensors
    r = case.routing
    router = mo.Router.Config(top_k=case.K, score_func=r["score_func"], route_norm=r["route_norm"],
                              route_scale=r["route_scale"], num_expert_groups=r["num_expert_groups"],
                              num_limited_groups=r["num_limited_groups"], group_score=r["group_score"],
                              router_dtype=r["router_dtype"], bias=r["gate_bias"], expert_bias=r["expert_bias"])
    shared = (mo.SharedExperts.Config(intermediate_size=case.I, gate=case.shared_gate) if case.shared else None)
    m = mo.MoE.Config(num_experts=case.E, router=router, experts=mo.GroupedExperts.Config(intermediate_size=case.I),
                      shared_experts=shared, backend=backend).build(hidden_size=case.H, dtype=case.dtype,
                                                                    device=DEVICE)
    with torch.no_grad():
        m.gate.weight.copy_(gw)
        m.experts.gate_up_proj.copy_(w13)
        m.experts.down_proj.copy_(w2)
        if r["gate_bias"]:
            m.gate.bias.copy_(kw["gate_bias"])
        if r["expert_bias"]:
            m.gate.expert_bias.copy_(kw["expert_bias"])
        if case.shared:
            m.shared_experts.gate_up_proj.copy_(kw["shared_w13"])
            m.shared_experts.down_proj.copy_(kw["shared_w2"])
            if case.shared_gate:
                m.shared_experts.shared_gate.copy_(kw["shared_gate"])
    return m


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@given(case=cases())
@settings(max_examples=max(1, settings().max_examples // (1 if LONG else 4)))
def test_modules_match_functional(backend, case):
    with recorded("modules", backend, case):
        _modules_match_functional(backend, case)


def _modules_match_functional(backend, case):
    tensors = build(case)
    x = tensors[0]
    m = module_for(case, backend, tensors)
    y, info = m(x, return_router_info=True)
    se = m.shared_experts
    shared = {} if se is None else dict(shared_w13=se.gate_up_proj, shared_w2=se.down_proj,
                                        shared_gate=se.shared_gate)
    y_f = mo.moe_forward(x, m.gate.weight, m.experts.gate_up_proj, m.experts.down_proj, case.K,
                         **m.gate.routing_kwargs(), **shared, backend=backend)
    torch.testing.assert_close(y, y_f, rtol=0, atol=0, equal_nan=True,
                               msg=lambda msg: f"{backend}: MoE module vs moe_forward: {msg}; {case.short()}")
    # the experts module on the module's own routing, against the reference's experts
    ids, w = info["topk_ids"], info["topk_weights"]
    got = m.experts(x, ids, w, backend=backend)
    ref = m.experts(x, ids, w, backend="torch")
    rows = torch.ones(case.T, dtype=torch.bool, device=x.device)
    for r in case.nan_rows + case.inf_rows:
        rows[r] = False
    assert_close_rows(got, ref, rows, case.dtype, f"{backend} GroupedExperts {case.short()}")


@st.composite
def bad_module_ids(draw, case: Case):
    T, K, E = case.T, case.K, case.E
    kind = draw(st.sampled_from(["float", "range", "negative", "shape", "bool"]))
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    if kind == "float":
        ids = ids.float() + draw(st.sampled_from([0.0, 0.3, 0.7]))
    elif kind == "range":
        ids[draw(st.integers(0, T - 1)), draw(st.integers(0, K - 1))] = E + draw(st.integers(0, 5))
    elif kind == "negative":
        ids[draw(st.integers(0, T - 1)), draw(st.integers(0, K - 1))] = -draw(st.integers(1, 3))
    elif kind == "shape":
        ids = ids[:-1] if draw(st.booleans()) else ids.reshape(-1)
    else:
        ids = ids > 0
    return kind, ids


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@given(data=st.data())
@settings(max_examples=settings().max_examples * (1 if LONG else 2))  # cheap: validation only
def test_module_invalid_ids_rejected(backend, data):
    case = data.draw(cases(allow_odd_inputs=False).filter(lambda c: c.T > 0))
    kind, ids = data.draw(bad_module_ids(case))
    tensors = build(case)
    m = module_for(case, backend, tensors)
    w = torch.rand(case.T, case.K, device=DEVICE)
    with recorded("module_invalid_ids", backend, case, kind=kind):
        with pytest.raises((ValueError, TypeError), match="topk_ids"):
            m.experts(tensors[0], ids.to(DEVICE), w, backend=backend)


# --------------------------------------------------------------------------------------- replay


class _Block(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.norm = nn.LayerNorm(moe.config.hidden_size)
        self.mlp = moe

    def forward(self, h):
        return h + self.mlp(self.norm(h))


class _Model(nn.Module):
    def __init__(self, rc: ReplayCase, make_moe):
        super().__init__()
        self.rc = rc
        if rc.model == "bare":
            self.moe = make_moe(0)
        else:
            self.blocks = nn.ModuleList([_Block(make_moe(1)), _Block(make_moe(2))])
        self.ckpt, self.outer = rc.ckpt, rc.outer

    @staticmethod
    def _run(mode, fn, h):
        return fn(h) if mode is None else checkpoint(fn, h, use_reentrant=mode == "reentrant")

    def _stack(self, h):
        for blk in self.blocks:
            h = self._run(self.ckpt, blk, h)
        return h

    def forward(self, x):
        if self.rc.model == "bare":
            return self._run(self.ckpt, self.moe, x)
        return self._run(self.outer, self._stack, x)


def _replay_run(rc: ReplayCase, backend: str, checkpointed: bool):
    case = rc.case
    g = torch.Generator().manual_seed(case.seed)

    def make_moe(i):
        c = Case(**{**case.__dict__, "seed": case.seed + i})
        return module_for(c, backend, build(c))

    torch.manual_seed(case.seed)
    model = _Model(rc, make_moe)
    if not checkpointed:
        model.ckpt = model.outer = None
    rr = mo.RouterReplay(model)
    n = len(rc.modes)
    xs = [torch.randn(case.T, case.H, generator=g).to(DEVICE).requires_grad_(rc.x_grad) for _ in range(n)]

    def ids():
        return {name: torch.stack([torch.randperm(case.E, generator=g)[:case.K] for _ in range(case.T)]).to(DEVICE)
                for name in rr.layer_names}

    probe = torch.randn(case.H, generator=g).to(DEVICE)
    losses = []
    for i, (x, mode) in enumerate(zip(xs, rc.modes)):
        offload = torch.autograd.graph.save_on_cpu() if rc.offload and checkpointed else torch.enable_grad()
        with offload:
            if mode == "replay":
                with rr.replay(ids()):
                    losses.append((model(x) * probe * (i + 1)).sum())
            elif mode == "record":
                with rr.record():
                    losses.append((model(x) * probe * (i + 1)).sum())
            else:
                losses.append((model(x) * probe * (i + 1)).sum())
        other = ids()   # drawn in both runs, so the generator stays in step
        if i in rc.no_grad_after:
            with torch.no_grad(), rr.replay(other):
                model(torch.randn(case.T, case.H, generator=g).to(DEVICE))
    if rc.order is None or not checkpointed:
        sum(losses).backward()
    else:
        for i in rc.order:
            losses[i].backward()
    grads = {n_: p.grad for n_, p in model.named_parameters() if p.grad is not None}
    return grads, [x.grad for x in xs]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@given(rc=replay_cases())
@settings(max_examples=max(1, settings().max_examples // (1 if LONG else 6)))  # interpreted backward is slow
@example(rc=ReplayCase(  # the case: two replayed micro-batches, one backward of the sum
    Case(4, 16, 4, 2, 8, torch.float32, 3, dict(score_func="softmax", route_norm=True, route_scale=1.0,
                                                 num_expert_groups=1, num_limited_groups=None,
                                                 group_score="top2_sum", router_dtype=torch.float32,
                                                 gate_bias=False, expert_bias=False)),
    ("replay", "replay"), "non_reentrant", None, False, None, (0,)))
def test_replay_microbatches_match_no_checkpoint(backend, rc):
    with recorded("replay", backend, rc):
        got, got_x = _replay_run(rc, backend, True)
        ref, ref_x = _replay_run(rc, backend, False)
        assert got.keys() == ref.keys(), rc.short()
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{backend} grad {name}: {m}; {rc.short()}")
        for a, b in zip(got_x, ref_x):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend} x.grad: {m}")
