"""Shared helpers of the ttx backend tests (interpreter on CPU, or a GPU with tests marked ``gpu``)."""
import torch

import mojo_opset as mo
from mojo_opset import dispatch as _dispatch
from mojo_opset.ops.combine import combine_reference
from mojo_opset.ops.experts import experts_loop
from mojo_opset.ops.gating import gating_reference
from mojo_opset.ops.names import MOE_COMBINE, MOE_EXPERTS, MOE_GATING, MOE_PERMUTE
from mojo_opset.ops.permute import permute_reference

REFERENCES = {MOE_GATING: gating_reference, MOE_PERMUTE: permute_reference, MOE_EXPERTS: experts_loop,
              MOE_COMBINE: combine_reference}


def ttx_available() -> bool:
    return bool(mo.available_backends().get("ttx", {}).get("available"))


def interpreted() -> bool:
    if not ttx_available():
        return False
    from mojo_opset_ttx.impls import INTERPRETED
    return INTERPRETED


def run_op(op, **call):
    """Run ``op`` through the dispatcher on the ttx backend; returns (result, last_served record)."""
    dev = next(v for v in call.values() if isinstance(v, torch.Tensor)).device
    out, _ = _dispatch.dispatch(op, REFERENCES[op], call, device=dev, backend="ttx")
    return out, mo.last_served(op)


def gating_call(logits, top_k, **kw):
    call = dict(logits=logits, top_k=top_k, score_func="softmax", route_norm=False, route_scale=1.0,
                expert_bias=None, num_expert_groups=1, num_limited_groups=None, group_score="top2_sum",
                forced_expert_ids=None)
    call.update(kw)
    if call["num_limited_groups"] is None:
        call["num_limited_groups"] = call["num_expert_groups"]
    return call


def grid_randn(*shape, step=1 / 64, generator=None, device="cpu"):
    """Gaussian values rounded to a grid: distinct values are far apart compared with the last-place
    differences between two exp implementations, so routing comparisons are exact, and equal values
    make true ties."""
    return (torch.randn(*shape, generator=generator) / step).round().mul(step).to(device)


def random_ids(T, E, K, generator=None, device="cpu"):
    if T == 0:
        return torch.empty(0, K, dtype=torch.int32, device=device)
    return torch.stack([torch.randperm(E, generator=generator)[:K] for _ in range(T)]).to(torch.int32).to(device)


def expert_weights(E, H, I, dtype, generator=None, device="cpu"):
    w13 = (torch.randn(E, 2 * I, H, generator=generator) / H ** 0.5).to(dtype).to(device)
    w2 = (torch.randn(E, H, I, generator=generator) / I ** 0.5).to(dtype).to(device)
    return w13, w2


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def assert_same_routing(ids, ref_ids, choice, atol=1e-5):
    """Ids equal the reference's, except where the reference's choice values are within ``atol`` of
    each other (true near-ties, where two correct exp/sigmoid implementations may disagree)."""
    diff = (ids != ref_ids).any(dim=1)
    if not diff.any():
        return
    rows = diff.nonzero()[:, 0]
    c = torch.nan_to_num(choice[rows].float(), nan=float("-inf"))
    got = c.gather(1, ids[rows].long()).sort(dim=1, descending=True).values
    want = c.gather(1, ref_ids[rows].long()).sort(dim=1, descending=True).values
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
