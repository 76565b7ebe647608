"""Shared helpers of the ttx backend tests (interpreter on CPU, or a GPU with tests marked ``gpu``)."""
import torch

import mojo_opset as mo
from mojo_opset import dispatch as _dispatch
from mojo_opset.contract import GatingCall, RoutingOptions
from mojo_opset.contract.names import MOE_COMBINE, MOE_EXPERTS, MOE_GATING, MOE_PERMUTE
from mojo_opset.functional.combine import combine_reference_call
from mojo_opset.functional.gating import gating_reference_call
from mojo_opset.functional.permute import permute_reference_call
from mojo_opset.reference.experts import experts_loop

REFERENCES = {MOE_GATING: gating_reference_call, MOE_PERMUTE: permute_reference_call,
              MOE_EXPERTS: lambda call: experts_loop(call.permuted_x, call.group_ends, call.w13, call.w2),
              MOE_COMBINE: combine_reference_call}


def ttx_available() -> bool:
    return bool(mo.available_backends().get("ttx", {}).get("available"))


def interpreted() -> bool:
    if not ttx_available():
        return False
    mo.registry.get_entry("ttx").impls()     # loads the kernels, which fixes the mode they run in
    from mojo_opset_ttx.platform import kernels_interpreted
    return kernels_interpreted()


def run_op(call):
    """Run the typed ``call`` through the dispatcher on the ttx backend; returns (result, last_served record)."""
    out, _ = _dispatch.dispatch(call, REFERENCES[call.op], backend="ttx")
    return out, mo.last_served(call.op)


def reasons(impl, call):
    """Every reason ``impl`` gives for ``call`` (declared and extra), as the dispatcher asks."""
    from mojo_opset_ttx import TtxBackend
    return impl.declared_reasons(call, TtxBackend.device_types)


def gating_call(logits, top_k, num_expert_groups=1, num_limited_groups=None, **kw):
    """A GatingCall normalised as the core builds it: keeping every group is no group limit."""
    L = num_expert_groups if num_limited_groups is None else num_limited_groups
    G = num_expert_groups
    if L == G:
        G = L = 1
    routing = RoutingOptions(top_k=top_k, num_expert_groups=G, num_limited_groups=L, **kw)
    return GatingCall(logits=logits, routing=routing)


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
