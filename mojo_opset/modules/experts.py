"""Expert weight modules: routed ``GroupedExperts`` and the dense ``SharedExperts`` MLP."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..reference.swiglu import ACTIVATIONS
from ..functional.checks import validate_experts, validate_shared, validate_topk_ids
from ..functional.forward import routed_experts
from ..reference.shared import shared_experts
from ..validation import FLOAT_DTYPES, check_tensor
from ._init import as_generator, filled, normal_, require


class GroupedExperts(nn.Module):
    """E SwiGLU experts in Hugging Face's fused layout.

    ``gate_up_proj`` ``[E, 2I, H]``: rows ``[:I]`` are gate_proj, rows ``[I:]`` up_proj (the two
    halves one after the other, as transformers' fused ``experts.gate_up_proj`` that it splits with
    ``.chunk(2, dim=-1)``; not interleaved).  ``down_proj`` ``[E, H, I]``.  With expert parallelism
    E is the rank's local expert count.
    """

    @dataclass
    class Config:
        intermediate_size: int | None = None
        activation: str = "swiglu"
        init_std: float = 0.02
        hidden_size: int | None = None   # filled in by the parent at build()
        num_experts: int | None = None   # filled in by the parent (local experts under EP)

        def build(self, *, hidden_size: int | None = None, num_experts: int | None = None,
                  dtype: torch.dtype | None = None, device=None) -> "GroupedExperts":
            return GroupedExperts(filled(self, hidden_size=hidden_size, num_experts=num_experts),
                                  dtype=dtype, device=device)

        def validate(self) -> None:
            require(self, "intermediate_size", "hidden_size", "num_experts")
            if self.activation not in ACTIVATIONS:
                raise ValueError(f"GroupedExperts.Config.activation must be one of {ACTIVATIONS}, "
                                 f"got {self.activation!r}")

    def __init__(self, config: "GroupedExperts.Config", *, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        config.validate()
        self.config = config
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H, dtype=dtype, device=device))
        self.down_proj = nn.Parameter(torch.empty(E, H, I, dtype=dtype, device=device))
        self.init_weights(0)

    def init_weights(self, seed_or_generator=0) -> None:
        gen = as_generator(seed_or_generator)
        normal_(self.gate_up_proj, self.config.init_std, gen)
        normal_(self.down_proj, self.config.init_std, gen)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                backend: str | None = None) -> torch.Tensor:
        """Routed-expert output ``[T, H]`` for tokens ``x [T, H]`` already routed (no shared experts)."""
        check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
        validate_experts(x, self.gate_up_proj, self.down_proj, self.config.num_experts, self.config.activation,
                         "gate_up_proj", "down_proj")
        # ids as the functional ops take them: a float id would be truncated, one outside [0, E) dropped
        # or read out of bounds by a kernel
        validate_topk_ids(topk_ids, x.shape[0], self.config.num_experts, x.device)
        check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, device=x.device, shape=tuple(topk_ids.shape))
        return routed_experts(x, topk_ids.to(torch.int32), topk_weights.float(), (self.gate_up_proj, self.down_proj),
                              self.config.activation, backend)

    def extra_repr(self) -> str:
        c = self.config
        return f"num_experts={c.num_experts}, hidden_size={c.hidden_size}, intermediate_size={c.intermediate_size}"


class SharedExperts(nn.Module):
    """Always-on SwiGLU MLP: ``gate_up_proj`` ``[2*I_s, H]`` (gate rows, then up rows), ``down_proj``
    ``[H, I_s]``, and with ``gate=True`` a per-token scale ``sigmoid(x @ shared_gate.T)``,
    ``shared_gate`` ``[1, H]`` (Qwen2-MoE's shared_expert_gate)."""

    @dataclass
    class Config:
        intermediate_size: int | None = None
        gate: bool = False
        init_std: float = 0.02
        hidden_size: int | None = None   # filled in by the parent at build()

        def build(self, *, hidden_size: int | None = None, dtype: torch.dtype | None = None,
                  device=None) -> "SharedExperts":
            return SharedExperts(filled(self, hidden_size=hidden_size), dtype=dtype, device=device)

        def validate(self) -> None:
            require(self, "intermediate_size", "hidden_size")

    def __init__(self, config: "SharedExperts.Config", *, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        config.validate()
        self.config = config
        H, I = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(2 * I, H, dtype=dtype, device=device))
        self.down_proj = nn.Parameter(torch.empty(H, I, dtype=dtype, device=device))
        self.shared_gate = nn.Parameter(torch.empty(1, H, dtype=dtype, device=device)) if config.gate else None
        self.init_weights(0)

    def init_weights(self, seed_or_generator=0) -> None:
        gen = as_generator(seed_or_generator)
        normal_(self.gate_up_proj, self.config.init_std, gen)
        normal_(self.down_proj, self.config.init_std, gen)
        if self.shared_gate is not None:
            normal_(self.shared_gate, self.config.init_std, gen)

    def weights(self) -> tuple:
        """``(shared_w13, shared_w2, shared_gate)`` as moe_forward takes them."""
        return self.gate_up_proj, self.down_proj, self.shared_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        validate_shared(x2, *self.weights())
        return shared_experts(x2, *self.weights()).reshape(shape)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.config.hidden_size}, intermediate_size={self.config.intermediate_size}, "
                f"gate={self.config.gate}")
