"""Hypothesis strategies for MoE problems: sizes, routing options, dtypes, odd inputs."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from mojo_opset import QUANT_SCHEMES

LONG = os.environ.get("MOJO_FUZZ_PROFILE", "ci") == "long"
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# the interpreter is slow and its bf16 tl.dot is wrong: small shapes, fp16/fp32 on CPU
MAX_T = 300 if LONG else 24
MAX_H = 256 if (LONG or ON_GPU) else 48
MAX_E = 300 if LONG else 24
MAX_I = 128 if (LONG or ON_GPU) else 32
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@dataclass
class Case:
    T: int
    H: int
    E: int
    K: int
    I: int
    dtype: torch.dtype
    seed: int
    routing: dict = field(default_factory=dict)
    shared: bool = False
    shared_gate: bool = False
    nan_rows: tuple = ()
    inf_rows: tuple = ()
    x_layout: str = "contiguous"   # one of X_LAYOUTS
    w_layout: str = "contiguous"   # one of W_LAYOUTS: gate_weight, w13, w2 (and the shared weights)
    ties: bool = False
    # (expert, value) entries of expert_bias set to NaN, -inf, +inf or an exact tie: NaN must rank
    # below every number, -inf included (SPEC 3.1 step 5)
    special_bias: tuple = ()

    def short(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.routing.items() if v not in (None, False))
        return (f"T{self.T} H{self.H} E{self.E} K{self.K} I{self.I} {str(self.dtype)[6:]} seed{self.seed} "
                f"{opts} shared={self.shared} nan={self.nan_rows} inf={self.inf_rows} "
                f"x={self.x_layout} w={self.w_layout} ties={self.ties} special_bias={self.special_bias}")


# how a tensor is laid out in memory: "strided" is every other column of a wider buffer, "offset" a
# slice starting 3 elements into its storage (misaligned), "transposed" the transpose of a contiguous
# [..., cols, rows] buffer (column-major weights)
X_LAYOUTS = ("contiguous", "strided", "offset")
W_LAYOUTS = ("contiguous", "offset", "transposed")


def place(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in the given memory layout (``t`` itself when contiguous, else a view of a new
    buffer)."""
    if layout == "contiguous":
        return t
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "offset":
        buf = torch.zeros(t.numel() + 3, dtype=t.dtype, device=t.device)
        buf[3:] = t.reshape(-1)
        return buf[3:].view(t.shape)
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(f"layout must be one of {X_LAYOUTS + W_LAYOUTS}, got {layout!r}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


SPECIAL_BIAS = (float("nan"), float("-inf"), float("inf"), 0.0)


@st.composite
def special_bias(draw, E: int, K: int) -> tuple:
    """Experts whose bias is NaN, -inf, +inf or 0.0 (ties with each other), NaN and -inf alone about
    half the time.  Half the time fewer than K experts keep a finite bias, so the top K must rank the
    special ones against each other."""
    if draw(st.booleans()):
        n = E - draw(st.integers(0, K - 1))
    else:
        n = draw(st.integers(1, min(E, 4)))
    experts = draw(st.lists(st.integers(0, E - 1), min_size=n, max_size=n, unique=True))
    if n >= 2 and draw(st.booleans()):
        values = [SPECIAL_BIAS[i % 2] for i in range(n)]      # NaN, -inf, NaN, -inf
    else:
        values = draw(st.lists(st.sampled_from(SPECIAL_BIAS), min_size=n, max_size=n))
    return tuple(zip(experts, values))


@st.composite
def cases(draw, allow_odd_inputs: bool = True) -> Case:
    T = draw(st.one_of(st.sampled_from([0, 1, 1, 2]), st.integers(0, MAX_T)))
    H = 16 * draw(st.integers(1, MAX_H // 16))
    E = draw(st.one_of(st.sampled_from([1, 2, 3, 8, 16]), st.integers(1, MAX_E)))
    K = draw(st.integers(1, min(E, 16)))
    I = 16 * draw(st.integers(1, MAX_I // 16))
    dtype = draw(st.sampled_from(DTYPES))
    score_func = draw(st.sampled_from(["softmax", "sigmoid"]))
    G = draw(st.sampled_from(_divisors(E)))
    per = E // G
    min_l = -(-K // per)  # kept groups must be able to supply K experts
    L = draw(st.integers(min_l, G)) if G > 1 else None
    routing = dict(
        score_func=score_func,
        route_norm=draw(st.booleans()),
        route_scale=draw(st.sampled_from([1.0, 1.0, 2.5, 0.5])),
        num_expert_groups=G,
        num_limited_groups=L,
        group_score=draw(st.sampled_from(["top2_sum", "max"])),
        router_dtype=draw(st.sampled_from([torch.float32, torch.float32, None])),
        gate_bias=draw(st.booleans()),
        expert_bias=draw(st.booleans()),
    )
    nan_rows = inf_rows = ()
    if allow_odd_inputs and T > 0:
        if draw(st.integers(0, 9)) == 0:
            nan_rows = (draw(st.integers(0, T - 1)),)
        if draw(st.integers(0, 9)) == 0:
            inf_rows = (draw(st.integers(0, T - 1)),)
    special = ()
    if allow_odd_inputs and draw(st.integers(0, 3)) == 0:
        routing["expert_bias"] = True
        special = draw(special_bias(E, K))
    # contiguous about half the time; each other layout about a sixth
    x_layout = draw(st.sampled_from(("contiguous",) * 4 + X_LAYOUTS[1:] * 2))
    w_layout = draw(st.sampled_from(("contiguous",) * 4 + W_LAYOUTS[1:] * 2))
    return Case(T, H, E, K, I, dtype, draw(st.integers(0, 2**31 - 1)), routing,
                shared=draw(st.integers(0, 3)) == 0, shared_gate=draw(st.booleans()),
                nan_rows=nan_rows, inf_rows=inf_rows, x_layout=x_layout, w_layout=w_layout,
                ties=draw(st.integers(0, 5)) == 0, special_bias=special)


def build(case: Case, requires_grad: bool = False):
    """Tensors for a case: (x, gate_weight, w13, w2, kwargs for moe_forward)."""
    g = torch.Generator().manual_seed(case.seed)
    dt, dev = case.dtype, DEVICE

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(dev)

    x = rnd(case.T, case.H)
    for r in case.nan_rows:
        x[r] = float("nan")
    for r in case.inf_rows:
        x[r, 0] = float("inf")
    x = place(x, case.x_layout)
    gw = rnd(case.E, case.H, scale=case.H ** -0.5)
    if case.ties and case.E > 1:  # duplicated router rows give exactly tied scores
        gw[1::2] = gw[0:-1:2][: gw[1::2].shape[0]]
    gw = place(gw, case.w_layout)
    w13 = place(rnd(case.E, 2 * case.I, case.H, scale=case.H ** -0.5), case.w_layout)
    w2 = place(rnd(case.E, case.H, case.I, scale=case.I ** -0.5), case.w_layout)
    r = dict(case.routing)
    kw = {k: r[k] for k in ("score_func", "route_norm", "route_scale", "num_expert_groups",
                            "num_limited_groups", "group_score", "router_dtype")}
    if r["gate_bias"]:
        kw["gate_bias"] = rnd(case.E, scale=0.1)
    if r["expert_bias"]:
        bias = torch.randn(case.E, generator=g) * 0.05
        for e, v in case.special_bias:
            bias[e] = v
        kw["expert_bias"] = bias.to(dev)
    if case.shared:
        kw["shared_w13"] = place(rnd(2 * case.I, case.H, scale=case.H ** -0.5), case.w_layout)
        kw["shared_w2"] = place(rnd(case.H, case.I, scale=case.I ** -0.5), case.w_layout)
        if case.shared_gate:
            kw["shared_gate"] = rnd(1, case.H, scale=case.H ** -0.5)
    if requires_grad:
        for t in (x, gw, w13, w2):
            t.requires_grad_(True)
    return x, gw, w13, w2, kw


@dataclass
class QuantCase:
    case: Case
    scheme: str
    group_size: int | None

    def expected_error(self) -> str | None:
        """The argument a valid library must name when it rejects this combination, else None."""
        H, I = self.case.H, self.case.I
        if self.scheme.startswith("w4"):
            g = self.group_size or 128
            return "group_size" if H % g or I % g else None
        if self.scheme.endswith("fp8_block") and I % 128:
            return "multiple of 128"
        return None

    def short(self) -> str:
        return f"{self.scheme} group={self.group_size} {self.case.short()}"


@st.composite
def quant_cases(draw) -> QuantCase:
    """A problem and a quantization scheme, the scheme's constraints on H and I met most of the time."""
    case = draw(cases(allow_odd_inputs=False))
    scheme = draw(st.sampled_from(QUANT_SCHEMES))
    group = None
    if scheme.endswith("fp8_block") and draw(st.integers(0, 3)) > 0:
        case.I = 128                   # fp8 blocks are 128 x 128 and may not straddle w13's halves
    if scheme.startswith("w4"):
        fits = [g for g in (16, 32, 64, 128) if case.H % g == 0 and case.I % g == 0]
        group = draw(st.sampled_from([None] + fits))
    return QuantCase(case, scheme, group)


# ---------------------------------------------------------------------------------------------------
# router replay sequences: several micro-batches, checkpointing, backward in any order

CKPT_MODES = (None, "reentrant", "non_reentrant")
MICROBATCH_MODES = ("replay", "record", "natural")


@dataclass
class ReplayCase:
    """Micro-batches run one after another through a small model with a RouterReplay attached, each
    replayed (its own ids), recorded or natural, then backpropagated in ``order`` (None: one backward
    of the sum).  ``model``: "blocks" (two LayerNorm + MoE blocks) or "bare" (one MoE applied to the
    data itself, whose input then needs no gradient unless ``x_grad``)."""
    case: Case                 # sizes, routing options and seed (dtype float32, no odd inputs)
    modes: tuple               # per micro-batch, of MICROBATCH_MODES
    ckpt: str | None           # checkpoint mode of each block (or of the bare MoE)
    outer: str | None          # checkpoint mode of the whole model around it (nested checkpoints)
    offload: bool              # torch.autograd.graph.save_on_cpu around the forwards
    order: tuple | None
    no_grad_after: tuple       # micro-batches followed by a replayed forward under torch.no_grad()
    model: str = "blocks"
    x_grad: bool = True

    def short(self) -> str:
        return (f"modes={self.modes} ckpt={self.ckpt} outer={self.outer} offload={self.offload} "
                f"order={self.order} no_grad_after={self.no_grad_after} model={self.model} "
                f"x_grad={self.x_grad} {self.case.short()}")


@st.composite
def replay_cases(draw) -> ReplayCase:
    T = draw(st.integers(1, 6))
    E = draw(st.sampled_from([2, 4, 8]))
    K = draw(st.integers(1, min(E, 3)))
    G = draw(st.sampled_from(_divisors(E)))
    per = E // G
    L = draw(st.integers(-(-K // per), G)) if G > 1 else None
    routing = dict(score_func=draw(st.sampled_from(["softmax", "sigmoid"])), route_norm=draw(st.booleans()),
                   route_scale=draw(st.sampled_from([1.0, 2.5])), num_expert_groups=G, num_limited_groups=L,
                   group_score=draw(st.sampled_from(["top2_sum", "max"])), router_dtype=torch.float32,
                   gate_bias=draw(st.booleans()), expert_bias=draw(st.booleans()))
    case = Case(T, 16, E, K, 8, torch.float32, draw(st.integers(0, 2**31 - 1)), routing)
    n = draw(st.integers(2, 3))
    modes = tuple(draw(st.sampled_from(MICROBATCH_MODES[:1] * 3 + MICROBATCH_MODES[1:])) for _ in range(n))
    model = draw(st.sampled_from(["blocks", "blocks", "bare"]))
    ckpt = draw(st.sampled_from(CKPT_MODES))
    outer = draw(st.sampled_from(CKPT_MODES)) if model == "blocks" else None
    # reentrant checkpointing needs an input that requires grad (else its output has none)
    x_grad = True if "reentrant" in (ckpt, outer) else draw(st.booleans())
    order = draw(st.one_of(st.none(), st.permutations(range(n)).map(tuple)))
    no_grad_after = tuple(i for i in range(n) if draw(st.integers(0, 3)) == 0)
    return ReplayCase(case, modes, ckpt, outer, draw(st.integers(0, 3)) == 0, order, no_grad_after, model, x_grad)
