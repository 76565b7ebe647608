"""A minimal vendor backend: overrides two ops, declares what it serves, declines the rest.

It is what a vendor's package looks like: it imports only the public plugin API (``Backend``,
``OpImpl``) and the op names, and is registered only through the ``mojo_opset.backends`` entry point.
"""
import os

import torch

from mojo_opset import Backend, OpImpl
from mojo_opset.contract import MOE_COMBINE, MOE_GATING

CALLS = {MOE_COMBINE: 0, MOE_GATING: 0}


class DemoCombine(OpImpl):
    op = MOE_COMBINE
    dtypes = (torch.float32, torch.bfloat16)   # a float16 call is declined: "dtype float16: serves ..."

    def forward(self, call):
        CALLS[MOE_COMBINE] += 1
        T, K = call.topk_weights.shape
        H = call.expert_out.shape[1]
        rows = call.expert_out.index_select(0, call.pair_row.long()).float().view(T, K, H)
        return torch.einsum("tkh,tk->th", rows, call.topk_weights.float()).to(call.expert_out.dtype)


class DemoGating(OpImpl):
    op = MOE_GATING
    # softmax top-k with renormalisation and scale; any other option (sigmoid, expert bias, groups,
    # router replay) is declined by the core with a reason naming it
    options = frozenset({"route_norm", "route_scale"})

    def forward(self, call):
        CALLS[MOE_GATING] += 1
        r = call.routing
        scores = torch.softmax(call.logits.float(), dim=-1)
        choice = scores.masked_fill(scores.isnan(), float("-inf"))      # NaN ranks below every number
        ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :r.top_k]
        w = scores.gather(1, ids)
        if r.route_norm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return ids.to(torch.int32), w * r.route_scale, scores


class DemoBackend(Backend):
    name = "demo"
    description = "demo vendor backend (tests only)"
    api_version = "0.2"          # the plugin API this file was written for
    device_types = ("cpu",)

    def unavailable_reason(self):
        if os.environ.get("MOJO_VENDOR_DEMO") != "1":
            return "the demo vendor backend is enabled only with MOJO_VENDOR_DEMO=1"
        return None

    def load(self):
        return {MOE_COMBINE: DemoCombine(), MOE_GATING: DemoGating()}
