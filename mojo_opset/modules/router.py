"""The router module: ``gate.weight [E, H]`` (+ optional ``bias``) and the fp32 ``expert_bias`` buffer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..functional.gating import moe_gating
from ..reference.gating import GROUP_SCORES, SCORE_FUNCS
from ..validation import FLOAT_DTYPES
from ._init import as_generator, filled, normal_, require


class Router(nn.Module):
    """Routes tokens to experts with :func:`mojo_opset.moe_gating`.

    Parameter names follow Hugging Face's MoE blocks: ``weight`` ``[E, H]`` (nn.Linear layout),
    optional ``bias`` ``[E]``, and the ``expert_bias`` buffer ``[E]`` kept in fp32 whatever the
    module dtype (aux-loss-free balancing: it changes which experts are chosen, never the weights).
    """

    # marks modules that RouterReplay drives (forward takes forced_expert_ids, sets last_topk_ids)
    _mojo_routing_layer = True

    @dataclass
    class Config:
        top_k: int = 2
        score_func: str = "softmax"
        route_norm: bool = False
        route_scale: float = 1.0
        num_expert_groups: int = 1
        num_limited_groups: int | None = None
        group_score: str = "top2_sum"
        router_dtype: torch.dtype | None = torch.float32
        bias: bool = False
        expert_bias: bool = False
        init_std: float = 0.02
        backend: str | None = None       # used when the router runs on its own
        hidden_size: int | None = None   # filled in by the parent at build()
        num_experts: int | None = None   # filled in by the parent at build()

        def build(self, *, hidden_size: int | None = None, num_experts: int | None = None,
                  dtype: torch.dtype | None = None, device=None) -> "Router":
            return Router(filled(self, hidden_size=hidden_size, num_experts=num_experts), dtype=dtype, device=device)

        def validate(self) -> None:
            require(self, "hidden_size", "num_experts", "top_k")
            E, K = self.num_experts, self.top_k
            if K > E:
                raise ValueError(f"Router.Config.top_k must be <= num_experts = {E}, got {K}")
            if self.score_func not in SCORE_FUNCS:
                raise ValueError(f"Router.Config.score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
            if self.group_score not in GROUP_SCORES:
                raise ValueError(f"Router.Config.group_score must be one of {GROUP_SCORES}, got {self.group_score!r}")
            G = self.num_expert_groups
            if isinstance(G, bool) or not isinstance(G, int) or G < 1 or E % G:
                raise ValueError(f"Router.Config.num_expert_groups must be a positive divisor of num_experts = {E}, "
                                 f"got {G!r}")
            L = G if self.num_limited_groups is None else self.num_limited_groups
            if not 1 <= L <= G:
                raise ValueError(f"Router.Config.num_limited_groups must lie in [1, {G}], got {L}")
            if L * (E // G) < K:
                raise ValueError(f"Router.Config: num_limited_groups x experts per group must be >= top_k: "
                                 f"{L} x {E // G} < {K}")
            if self.router_dtype is not None and self.router_dtype not in FLOAT_DTYPES:
                raise ValueError(f"Router.Config.router_dtype must be a float dtype or None, got {self.router_dtype}")

    def __init__(self, config: "Router.Config", *, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        config.validate()
        self.config = config
        E, H = config.num_experts, config.hidden_size
        self.weight = nn.Parameter(torch.empty(E, H, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(E, dtype=dtype, device=device)) if config.bias else None
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32, device=device)
                             if config.expert_bias else None)
        self.last_topk_ids: torch.Tensor | None = None
        self.init_weights(0)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def top_k(self) -> int:
        return self.config.top_k

    def init_weights(self, seed_or_generator=0) -> None:
        """Deterministic init: weight ~ N(0, init_std^2) (drawn on the CPU), bias and expert_bias zero."""
        gen = as_generator(seed_or_generator)
        normal_(self.weight, self.config.init_std, gen)
        with torch.no_grad():
            if self.bias is not None:
                self.bias.zero_()
            if self.expert_bias is not None:
                self.expert_bias.zero_()

    def routing_kwargs(self) -> dict:
        """The routing keywords of moe_gating / moe_forward that this router's config and state fix."""
        c = self.config
        return dict(gate_bias=self.bias, score_func=c.score_func, route_norm=c.route_norm,
                    route_scale=float(c.route_scale), expert_bias=self.expert_bias,
                    num_expert_groups=c.num_expert_groups, num_limited_groups=c.num_limited_groups,
                    group_score=c.group_score, router_dtype=c.router_dtype)

    def forward(self, x: torch.Tensor, *, forced_expert_ids: torch.Tensor | None = None,
                return_scores: bool = False):
        """``(topk_ids int32 [T, K], topk_weights fp32 [T, K])`` (+ ``scores`` with return_scores)."""
        ids, weights, scores = moe_gating(x, self.weight, self.config.top_k, **self.routing_kwargs(),
                                          forced_expert_ids=forced_expert_ids, backend=self.config.backend,
                                          return_scores=True)
        self.last_topk_ids = ids
        return (ids, weights, scores) if return_scores else (ids, weights)

    def _apply(self, fn, recurse=True):
        # keep expert_bias in fp32 across .to(dtype)/.half(): move it to the new device only
        eb = self._buffers.pop("expert_bias", None)
        try:
            out = super()._apply(fn, recurse)
        finally:
            if eb is not None:
                probe = fn(torch.empty(0, device=eb.device))
                eb = eb.to(probe.device)
            self._buffers["expert_bias"] = eb
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden_size={c.hidden_size}, num_experts={c.num_experts}, top_k={c.top_k}, "
                f"score_func={c.score_func}, router_dtype={c.router_dtype}")
