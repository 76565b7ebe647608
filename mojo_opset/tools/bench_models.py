"""The benchmark model shapes and token counts, and their weights generated on the device.

The one table of model shapes: ``mojo-opset bench`` times them, ``mojo-opset compare`` adds their
model-sized cases on a GPU, and the Triton tile tuner (``mojo_opset_triton.tune``) tunes them.

Weights are filled in place in the target dtype (no fp32 staging copy), so DeepSeek-V3's 256
experts (about 22 GB in bf16) fit next to the activations on an 80 GB GPU; ``--experts-cap`` (or a
memory check) lowers E where they do not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from mojo_opset.suggest import did_you_mean


@dataclass(frozen=True)
class ModelShape:
    name: str
    H: int
    I: int
    E: int
    K: int
    routing: dict = field(default_factory=dict)
    note: str = ""

    @property
    def groups(self) -> int:
        return int(self.routing.get("num_expert_groups", 1))

    def weight_bytes(self, dtype: torch.dtype, experts: int | None = None) -> int:
        e = self.E if experts is None else experts
        return e * 3 * self.H * self.I * torch.empty((), dtype=dtype).element_size()

    def flops(self, T: int) -> int:
        """Expert GEMM FLOPs of T tokens (gate/up and down projections; the router GEMM is <1% and
        is left out, as in the roofline)."""
        return 6 * T * self.K * self.H * self.I

    def capped(self, cap: int) -> "ModelShape":
        """The same model with at most ``cap`` experts (a multiple of the group count, >= K)."""
        if cap >= self.E:
            return self
        G = self.groups
        e = max(cap // G * G, G)
        routing = dict(self.routing)
        if G > 1:
            per = e // G
            kept = routing.get("num_limited_groups", G)
            routing["num_limited_groups"] = min(G, max(kept, math.ceil(self.K / per)))
        if e < self.K:
            raise ValueError(f"--experts-cap {cap}: {self.name} needs at least K = {self.K} experts")
        return replace(self, E=e, routing=routing, note=f"{e} of {self.E} experts")


MODELS = {
    "mixtral-8x7b": ModelShape("mixtral-8x7b", 4096, 14336, 8, 2, dict(score_func="softmax", route_norm=True)),
    "qwen3-30b-a3b": ModelShape("qwen3-30b-a3b", 2048, 768, 128, 8, dict(score_func="softmax", route_norm=True)),
    "deepseek-v3": ModelShape("deepseek-v3", 7168, 2048, 256, 8, dict(
        score_func="sigmoid", route_norm=True, route_scale=2.5, expert_bias=True, num_expert_groups=8,
        num_limited_groups=4, group_score="top2_sum")),
    # CPU / CI sizes
    "tiny": ModelShape("tiny", 128, 64, 8, 2, dict(score_func="softmax", route_norm=True)),
    "tiny-grouped": ModelShape("tiny-grouped", 128, 64, 16, 4, dict(
        score_func="sigmoid", route_norm=True, route_scale=2.5, expert_bias=True, num_expert_groups=4,
        num_limited_groups=2, group_score="top2_sum")),
}
ALIASES = {"mixtral": "mixtral-8x7b", "qwen3": "qwen3-30b-a3b", "qwen": "qwen3-30b-a3b", "deepseek": "deepseek-v3"}
DEFAULT_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3")
DEFAULT_TOKENS = (1, 16, 64, 256, 2048, 8192)   # decode to prefill
QUICK_TOKENS = (1, 16, 64)
QUICK_MODELS = ("tiny", "tiny-grouped")


def resolve(names: list[str]) -> list[ModelShape]:
    out = []
    for n in names:
        key = ALIASES.get(n.lower(), n.lower())
        if key not in MODELS:
            valid = list(MODELS) + list(ALIASES)
            raise ValueError(f"--models: unknown model {n!r}{did_you_mean(n, valid)}; expected one of: "
                             f"{', '.join(valid)}")
        out.append(MODELS[key])
    return out


def fit_to_memory(model: ModelShape, dtype: torch.dtype, device: torch.device, headroom_bytes: int) -> ModelShape:
    """Cap the experts so the weights fit in the free device memory minus ``headroom_bytes``."""
    if device.type != "cuda":
        return model
    free, _total = torch.cuda.mem_get_info(device)
    budget = free - headroom_bytes
    per_expert = model.weight_bytes(dtype, 1)
    if model.E * per_expert <= budget:
        return model
    return model.capped(max(int(budget // per_expert), model.K))


@dataclass
class Weights:
    gate_weight: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    routing: dict          # keyword arguments of mo.moe_forward (expert_bias tensor included)


def make_weights(model: ModelShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Weights:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    E, H, I = model.E, model.H, model.I

    def normal(shape, std, dt=dtype):
        return torch.empty(shape, dtype=dt, device=device).normal_(0.0, std, generator=g)

    w13 = normal((E, 2 * I, H), 1.0 / math.sqrt(H))
    w2 = normal((E, H, I), 1.0 / math.sqrt(I))
    gate = normal((E, H), 1.0 / math.sqrt(H))
    routing = dict(model.routing)
    if routing.pop("expert_bias", False):
        routing["expert_bias"] = normal((E,), 0.01, torch.float32)
    return Weights(gate, w13, w2, routing)


def make_tokens(model: ModelShape, T: int, dtype: torch.dtype, device: torch.device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator(device=device)
    g.manual_seed(seed + T)
    return torch.empty((T, model.H), dtype=dtype, device=device).normal_(0.0, 1.0, generator=g)
