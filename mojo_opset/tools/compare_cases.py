"""The embedded case matrix of ``mojo-opset compare``: ops x routing options x dtypes x shapes x edge cases.

Small shapes run everywhere (on a CPU-only machine the Triton kernels run in the interpreter, so
they are tiny); on a GPU the model shapes are added.  Routing-option variants run in the primary
dtype (with the default fp32 router their logits are fp32 whatever x's dtype); the basic case of
each op runs in every dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mojo_opset.contract.names import MOE_COMBINE, MOE_EXPERTS, MOE_FORWARD, MOE_GATING, MOE_PERMUTE, QUANT_MOE_FORWARD

from .bench_models import DEFAULT_MODELS, MODELS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

QUANT_SCHEMES = ("w8a8_int8", "w4a8_int4", "w8a16_int8", "w4a16_int4", "w8a8_fp8_block")

OP_ALIASES = {"gating": MOE_GATING, "permute": MOE_PERMUTE, "experts": MOE_EXPERTS, "combine": MOE_COMBINE,
              "forward": MOE_FORWARD, "quant": QUANT_MOE_FORWARD}


_SHORT = {
    "score_func": str, "route_norm": lambda v: "norm" if v else "", "route_scale": lambda v: f"x{v:g}",
    "expert_bias": lambda v: "ebias" if v else "", "gate_bias": lambda v: "gbias" if v else "",
    "router_dtype": lambda v: f"router={v}", "align": lambda v: f"align{v}", "scheme": str,
    "group_size": lambda v: f"gs{v}", "edge": str, "model": str,
}


@dataclass
class Case:
    op: str
    dtype: torch.dtype
    shape: dict                                   # T, H, E, K (+ I for expert ops)
    options: dict = field(default_factory=dict)   # JSON-friendly; see inputs.py for their meaning
    seed: int = 0

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def shape_str(self) -> str:
        return " ".join(f"{k}{v}" for k, v in self.shape.items())

    def options_str(self) -> str:
        """A compact label: ``sigmoid,norm,x2.5,ebias,g4/2:top2_sum,shared``."""
        o, parts = self.options, []
        for k, v in o.items():
            if k in ("num_limited_groups", "group_score"):
                continue
            if k == "num_expert_groups":
                parts.append(f"g{v}/{o.get('num_limited_groups', v)}:{o.get('group_score', 'top2_sum')}")
            elif k in _SHORT:
                parts.append(_SHORT[k](v))
            else:
                parts.append(k if v is True else f"{k}={v}")
        return ",".join(p for p in parts if p) or "-"


# --------------------------------------------------------------------------- shapes

SMALL = dict(T=13, H=64, I=32, E=8, K=2)          # odd T exercises the masked tails
GROUPED = dict(T=13, H=64, I=32, E=16, K=4)        # 4 groups of 4 experts
WIDE = dict(T=13, H=64, I=32, E=64, K=8)           # many experts, Qwen-like K
FP8 = dict(T=13, H=128, I=128, E=8, K=2)           # fp8 block scales need I % 128 == 0
MEDIUM = dict(T=333, H=256, I=128, E=8, K=2)       # several row blocks per expert (accelerators only)
# On a CPU the Triton kernels run in the interpreter at tens of ms per token-row, so the option
# variants use fewer tokens there (still odd); the basic case of each op keeps T=13.
CPU_VARIANT_T = 5

DEEPSEEK_V3 = dict(score_func="sigmoid", route_norm=True, route_scale=2.5, expert_bias=True,
                   num_expert_groups=4, num_limited_groups=2, group_score="top2_sum")
DEEPSEEK_V2 = dict(score_func="softmax", num_expert_groups=4, num_limited_groups=2, group_score="max")

# the model shapes of bench (one table: bench_models.MODELS); the forward cases cap DeepSeek-V3's
# experts to keep a compare run to seconds (the routing cases use all 256)
FORWARD_EXPERTS_CAP = {"deepseek-v3": 64}


def _shape(base: dict, **over) -> dict:
    s = dict(base)
    s.update(over)
    return s


def _gating_shape(s: dict) -> dict:
    return {k: s[k] for k in ("T", "H", "E", "K")}


def default_matrix(device_type: str, dtypes: list[torch.dtype], quant: bool = True) -> list[Case]:
    """All cases for one backend (the backend-specific skips are decided by the runner)."""
    primary = dtypes[0]
    halves = [d for d in dtypes if d != torch.float32]
    cases: list[Case] = []

    def add(op, shape, options=None, all_dtypes=False, only=None):
        for d in (dtypes if all_dtypes else ([only] if only is not None else [primary])):
            shp = _gating_shape(shape) if op == MOE_GATING else dict(shape)
            if device_type == "cpu" and not all_dtypes and shp["T"] == SMALL["T"]:
                shp["T"] = CPU_VARIANT_T
            cases.append(Case(op, d, shp, dict(options or {}), seed=len(cases)))

    # ---- gating: every routing option
    add(MOE_GATING, SMALL, dict(score_func="softmax"), all_dtypes=True)
    add(MOE_GATING, SMALL, dict(score_func="softmax", route_norm=True))
    add(MOE_GATING, SMALL, dict(score_func="sigmoid", gate_bias=True, route_norm=True))
    add(MOE_GATING, SMALL, dict(score_func="softmax", expert_bias=True, route_scale=2.0))
    add(MOE_GATING, GROUPED, DEEPSEEK_V3)
    add(MOE_GATING, GROUPED, DEEPSEEK_V2)
    add(MOE_GATING, GROUPED, dict(score_func="sigmoid", num_expert_groups=4, num_limited_groups=2,
                                  group_score="max", expert_bias=True))
    add(MOE_GATING, WIDE, dict(score_func="softmax", route_norm=True))
    add(MOE_GATING, SMALL, dict(score_func="softmax", route_norm=True, forced=True))
    add(MOE_GATING, GROUPED, dict(DEEPSEEK_V3, forced=True))
    for d in halves:  # router_dtype=None: the gating op sees half-precision logits
        add(MOE_GATING, SMALL, dict(score_func="softmax", router_dtype="input"), only=d)
    # gating edge cases
    add(MOE_GATING, _shape(SMALL, T=0), dict(score_func="softmax"))
    add(MOE_GATING, _shape(SMALL, T=1), dict(score_func="softmax", route_norm=True))
    add(MOE_GATING, SMALL, dict(score_func="softmax", edge="one_expert"))
    add(MOE_GATING, SMALL, dict(score_func="softmax", edge="near_ties"))
    add(MOE_GATING, GROUPED, dict(DEEPSEEK_V3, edge="near_ties"))
    add(MOE_GATING, SMALL, dict(score_func="softmax", edge="nan_row"))

    # ---- permute (align 1 and 16)
    add(MOE_PERMUTE, SMALL, dict(align=1), all_dtypes=True)
    add(MOE_PERMUTE, SMALL, dict(align=16))
    add(MOE_PERMUTE, _shape(SMALL, T=0), dict(align=1))
    add(MOE_PERMUTE, _shape(SMALL, T=1), dict(align=16))
    add(MOE_PERMUTE, _shape(SMALL, K=1), dict(align=1, edge="one_expert"))

    # ---- grouped experts (alignment: what the backend's experts kernel asks for)
    add(MOE_EXPERTS, SMALL, {}, all_dtypes=True)
    add(MOE_EXPERTS, _shape(SMALL, T=1), {})
    add(MOE_EXPERTS, _shape(SMALL, T=0), {})
    add(MOE_EXPERTS, _shape(SMALL, K=1), dict(edge="one_expert"))

    # ---- combine
    add(MOE_COMBINE, SMALL, dict(align=1), all_dtypes=True)
    add(MOE_COMBINE, SMALL, dict(align=16))
    add(MOE_COMBINE, _shape(SMALL, T=0), dict(align=1))
    add(MOE_COMBINE, _shape(SMALL, T=1), dict(align=1))

    # ---- MoE forward
    add(MOE_FORWARD, SMALL, dict(score_func="softmax", route_norm=True), all_dtypes=True)
    add(MOE_FORWARD, GROUPED, dict(DEEPSEEK_V3, shared=True))
    add(MOE_FORWARD, SMALL, dict(score_func="softmax", shared=True, shared_gate=True))
    add(MOE_FORWARD, SMALL, dict(score_func="softmax", route_norm=True, forced=True))
    add(MOE_FORWARD, _shape(SMALL, T=0), dict(score_func="softmax"))
    add(MOE_FORWARD, _shape(SMALL, T=1), dict(score_func="softmax", route_norm=True))
    add(MOE_FORWARD, _shape(SMALL, K=1), dict(score_func="softmax", edge="one_expert"))

    # ---- quantized MoE forward: activations in a half dtype (fp16 when fp32 is primary)
    if quant:
        qd = primary if primary != torch.float32 else (halves[0] if halves else torch.float16)
        for scheme in QUANT_SCHEMES:
            shape = FP8 if scheme == "w8a8_fp8_block" else SMALL
            opts = dict(scheme=scheme, score_func="softmax", route_norm=True)
            if "int4" in scheme:
                opts["group_size"] = 32
            add(QUANT_MOE_FORWARD, shape, opts, only=qd)
        add(QUANT_MOE_FORWARD, GROUPED, dict(DEEPSEEK_V3, scheme="w8a8_int8", shared=True), only=qd)

    # ---- larger shapes on an accelerator: several blocks per expert, then the real model sizes
    if device_type != "cpu":
        add(MOE_PERMUTE, MEDIUM, dict(align=16), all_dtypes=True)
        add(MOE_EXPERTS, MEDIUM, {}, all_dtypes=True)
        add(MOE_COMBINE, MEDIUM, dict(align=1), all_dtypes=True)
        add(MOE_FORWARD, MEDIUM, dict(score_func="softmax", route_norm=True), all_dtypes=True)
        model_dtype = torch.bfloat16 if torch.bfloat16 in dtypes else primary
        for m in (MODELS[name] for name in DEFAULT_MODELS):
            add(MOE_GATING, dict(T=2048, H=m.H, E=m.E, K=m.K), dict(m.routing, model=m.name), only=model_dtype)
            f = m.capped(FORWARD_EXPERTS_CAP.get(m.name, m.E))
            label = m.name if f is m else f"{m.name} ({f.note})"
            add(MOE_FORWARD, dict(T=256, H=f.H, I=f.I, E=f.E, K=f.K), dict(f.routing, model=label), only=model_dtype)
    return cases


def select(cases: list[Case], ops: list[str] | None) -> list[Case]:
    if not ops:
        return cases
    return [c for c in cases if c.op in ops]
