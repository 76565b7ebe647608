"""Backends built from the reference functions, for testing the tools: a correct one, a broken one,
one that declines every call, one that raises."""
import torch

import mojo_opset as mo
from mojo_opset.ops.combine import combine_reference
from mojo_opset.ops.experts import experts_loop
from mojo_opset.ops.gating import gating_reference
from mojo_opset.ops.permute import permute_reference


class FakeBackend(mo.Backend):
    device_types = ("cpu",)

    def __init__(self, name, impls):
        self.name = name
        self._impls = impls

    def load(self):
        return self._impls


def good():
    return FakeBackend("fake_good", {
        "moe_gating": mo.op_impl("moe_gating", gating_reference),
        "moe_permute": mo.op_impl("moe_permute", permute_reference),
        "moe_experts": mo.op_impl("moe_experts", experts_loop),
        "moe_combine": mo.op_impl("moe_combine", combine_reference),
    })


def broken_experts():
    """Experts off by 2 % on every row: what a wrong scale or a dropped term looks like."""
    def wrong(**call):
        return experts_loop(**call) * 1.02
    return FakeBackend("fake_broken", {"moe_experts": mo.op_impl("moe_experts", wrong)})


def broken_routing():
    """Picks the reference's second choice first: a clear routing error (not a near-tie)."""
    def wrong(**call):
        ids, w, s = gating_reference(**call)
        if ids.shape[1] > 1:
            ids = ids.flip(1).contiguous()
            w = w.flip(1).contiguous()
        return ids, w, s
    return FakeBackend("fake_bad_routing", {"moe_gating": mo.op_impl("moe_gating", wrong)})


def declining():
    return FakeBackend("fake_declining", {
        "moe_experts": mo.op_impl("moe_experts", experts_loop, reasons=lambda **call: ["no thanks"])})


def raising():
    def boom(**call):
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
