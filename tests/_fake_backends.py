"""Backends built from the reference functions, for testing the tools: a correct one, a broken one,
one that declines every call, one that raises."""
import dataclasses

import torch

import mojo_opset as mo
from mojo_opset.contract import RoutingOptions
from mojo_opset.functional.gating import gating_reference_call
from mojo_opset.reference.combine import combine_reference
from mojo_opset.reference.experts import experts_loop
from mojo_opset.reference.permute import permute_reference

# the reference implements every option: a backend built from it declares them all
ROUTING_OPTIONS = tuple(f.name for f in dataclasses.fields(RoutingOptions) if f.metadata.get("option"))


class FakeBackend(mo.Backend):
    device_types = ("cpu",)

    def __init__(self, name, impls):
        self.name = name
        self._impls = impls

    def load(self):
        return self._impls


def _experts(call):
    return experts_loop(call.permuted_x, call.group_ends, call.w13, call.w2)


def good():
    return FakeBackend("fake_good", {
        "moe_gating": mo.op_impl("moe_gating", gating_reference_call, options=ROUTING_OPTIONS),
        "moe_permute": mo.op_impl("moe_permute",
                                  lambda call: permute_reference(call.x, call.topk_ids, call.num_experts, call.align),
                                  options=("align",)),
        "moe_experts": mo.op_impl("moe_experts", _experts),
        "moe_combine": mo.op_impl("moe_combine", lambda call: combine_reference(call.expert_out, call.pair_row,
                                                                               call.topk_weights, call.num_tokens)),
    })


def broken_experts():
    """Experts off by 2 % on every row: what a wrong scale or a dropped term looks like."""
    def wrong(call):
        return _experts(call) * 1.02
    return FakeBackend("fake_broken", {"moe_experts": mo.op_impl("moe_experts", wrong)})


def broken_routing():
    """Picks the reference's second choice first: a clear routing error (not a near-tie)."""
    def wrong(call):
        ids, w, s = gating_reference_call(call)
        if ids.shape[1] > 1:
            ids = ids.flip(1).contiguous()
            w = w.flip(1).contiguous()
        return ids, w, s
    return FakeBackend("fake_bad_routing", {"moe_gating": mo.op_impl("moe_gating", wrong, options=ROUTING_OPTIONS)})


def declining():
    return FakeBackend("fake_declining", {
        "moe_experts": mo.op_impl("moe_experts", _experts, reasons=lambda call: ["no thanks"])})


def raising():
    def boom(call):
        raise RuntimeError("kernel exploded")
    return FakeBackend("fake_raising", {"moe_combine": mo.op_impl("moe_combine", boom)})


def register(*backends):
    for b in backends:
        mo.register_backend(b)
    return [b.name for b in backends]


def unregister(names):
    for n in names:
        mo.unregister_backend(n)
    torch.manual_seed(0)
