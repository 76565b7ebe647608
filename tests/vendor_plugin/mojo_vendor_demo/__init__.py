"""A minimal vendor backend: overrides two ops, declines what it cannot serve.

It is what a vendor's package looks like: no import of mojo_opset internals beyond the public
``Backend``/``OpImpl`` API, registered only through the ``mojo_opset.backends`` entry point.
"""
import os

import torch

from mojo_opset import Backend, OpImpl

CALLS = {"moe_combine": 0, "moe_gating": 0}


class DemoCombine(OpImpl):
    op = "moe_combine"

    def reasons(self, expert_out, pair_row, topk_weights, num_tokens):
        if expert_out.dtype == torch.float16:
            return ["dtype float16: the demo combine serves float32 and bfloat16 only"]
        return []

    def forward(self, expert_out, pair_row, topk_weights, num_tokens):
        CALLS["moe_combine"] += 1
        K = topk_weights.shape[1]
        rows = expert_out.index_select(0, pair_row.long()).float().view(num_tokens, K, -1)
        return torch.einsum("tkh,tk->th", rows, topk_weights.float()).to(expert_out.dtype)


class DemoGating(OpImpl):
    op = "moe_gating"

    def reasons(self, logits, top_k, score_func, forced_expert_ids, num_expert_groups, expert_bias, **_):
        out = []
        if forced_expert_ids is not None:
            out.append("forced_expert_ids (router replay) is not supported by the demo gating")
        if score_func != "softmax":
            out.append(f"score_func={score_func!r}: the demo gating serves softmax only")
        if num_expert_groups > 1 or expert_bias is not None:
            out.append("group-limited routing and expert bias are not supported by the demo gating")
        return out

    def forward(self, logits, top_k, score_func, route_norm, route_scale, **_):
        CALLS["moe_gating"] += 1
        scores = torch.softmax(logits.float(), dim=-1)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k]
        w = scores.gather(1, order)
        if route_norm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return order.to(torch.int32), w * route_scale, scores


class DemoBackend(Backend):
    name = "demo"
    description = "demo vendor backend (tests only)"
    device_types = ("cpu",)

    def unavailable_reason(self):
        if os.environ.get("MOJO_VENDOR_DEMO") != "1":
            return "the demo vendor backend is enabled only with MOJO_VENDOR_DEMO=1"
        return None

    def load(self):
        return {"moe_combine": DemoCombine(), "moe_gating": DemoGating()}
