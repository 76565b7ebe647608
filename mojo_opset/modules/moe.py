"""The MoE layer: router + grouped experts (+ shared experts), one call of ``mo.moe_forward``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import losses as _losses
from ..functional.forward import EP_MODES, moe_forward
from ..replay import in_backward
from ._init import as_generator, filled, require
from .experts import GroupedExperts, SharedExperts
from .router import Router

AUX_LOSSES = ("switch", "sequence", "global")


class MoE(nn.Module):
    """A Mixture-of-Experts layer: ``moe_forward`` with every routing option taken from the config.

    Submodules (and so state-dict names, as in Hugging Face's MoE blocks): ``gate`` (:class:`Router`:
    ``gate.weight``, ``gate.bias``, ``gate.expert_bias``), ``experts`` (:class:`GroupedExperts`:
    ``experts.gate_up_proj``, ``experts.down_proj``) and optionally ``shared_experts``
    (:class:`SharedExperts`).

    Training state: after each forward ``last_topk_ids`` and ``last_tokens_per_expert`` hold the
    routing; in training mode the expert loads accumulate for :meth:`update_expert_bias` and
    ``last_aux_losses`` holds the configured coefficient-weighted losses (sum them with
    :func:`mojo_opset.losses.collect_aux_losses`).  Forwards recomputed by activation checkpointing
    during backward update none of this state.
    """

    _mojo_routing_layer = True   # RouterReplay drives this module (see mojo_opset.replay)

    @dataclass
    class Config:
        num_experts: int | None = None
        experts: GroupedExperts.Config = field(default_factory=GroupedExperts.Config)
        router: Router.Config = field(default_factory=Router.Config)
        shared_experts: SharedExperts.Config | None = None
        hidden_size: int | None = None   # filled in by the parent model at build()
        backend: str | None = None       # None: the normal backend selection
        ep_mode: str = "allgather"
        aux_loss: str | None = None      # "switch" | "sequence" | "global" (balance over balance_group)
        aux_loss_coeff: float = 0.0
        z_loss_coeff: float = 0.0
        bias_update_rate: float = 0.0    # default rate of update_expert_bias()

        def build(self, *, hidden_size: int | None = None, dtype: torch.dtype | None = None, device=None,
                  ep_group=None, balance_group=None) -> "MoE":
            return MoE(filled(self, hidden_size=hidden_size), dtype=dtype, device=device, ep_group=ep_group,
                       balance_group=balance_group)

        def validate(self) -> None:
            require(self, "num_experts", "hidden_size")
            if self.ep_mode not in EP_MODES:
                raise ValueError(f"MoE.Config.ep_mode must be one of {EP_MODES}, got {self.ep_mode!r}")
            if self.aux_loss is not None and self.aux_loss not in AUX_LOSSES:
                raise ValueError(f"MoE.Config.aux_loss must be None or one of {AUX_LOSSES}, got {self.aux_loss!r}")
            for name in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise ValueError(f"MoE.Config.{name} must be a non-negative float, got {v!r}")

    def __init__(self, config: "MoE.Config", *, dtype: torch.dtype | None = None, device=None, ep_group=None,
                 balance_group=None):
        super().__init__()
        config.validate()
        self.config = config
        H, E = config.hidden_size, config.num_experts
        self.ep_group = ep_group
        self.balance_group = balance_group
        if ep_group is None:
            self.expert_range = (0, E)
        else:
            from ..distributed import local_expert_range
            self.expert_range = tuple(local_expert_range(E, ep_group))
        self.gate = config.router.build(hidden_size=H, num_experts=E, dtype=dtype, device=device)
        self.experts = config.experts.build(hidden_size=H, num_experts=self.expert_range[1] - self.expert_range[0],
                                            dtype=dtype, device=device)
        self.shared_experts = (config.shared_experts.build(hidden_size=H, dtype=dtype, device=device)
                               if config.shared_experts is not None else None)
        self.quantized = None   # a mojo_opset QuantizedExperts replaces `experts` in forward when set
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.int64, device=device), persistent=False)
        self.last_topk_ids: torch.Tensor | None = None
        self.last_tokens_per_expert: torch.Tensor | None = None
        self.last_aux_losses: dict[str, torch.Tensor] = {}
        self.init_weights(0)

    # ------------------------------------------------------------------ construction helpers

    @property
    def router(self) -> Router:
        return self.gate

    @property
    def top_k(self) -> int:
        return self.gate.config.top_k

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def init_weights(self, seed_or_generator=0) -> None:
        """Deterministic init from one CPU generator: router, then all E experts (a rank under EP keeps
        its slice of the same draw, so EP ranks hold exactly the EP=1 weights), then shared experts."""
        gen = as_generator(seed_or_generator)
        self.gate.init_weights(gen)
        ex = self.experts
        E, (lo, hi) = self.config.num_experts, self.expert_range
        std = ex.config.init_std
        with torch.no_grad():
            for p in (ex.gate_up_proj, ex.down_proj):
                full = torch.randn((E,) + tuple(p.shape[1:]), generator=gen, dtype=torch.float32).mul_(std)
                p.copy_(full[lo:hi])
        if self.shared_experts is not None:
            self.shared_experts.init_weights(gen)
        self.expert_load.zero_()

    @classmethod
    def config_from_hf(cls, config, layer_idx: int | None = None, family: str | None = None) -> "MoE.Config":
        """The :class:`MoE.Config` (with ``hidden_size`` set) of one MoE block of a Hugging Face Mixtral /
        Qwen2-MoE / Qwen3-MoE / DeepSeek-V2 / V3 config (object or dict)."""
        from ..hf.families import moe_block_spec

        s = moe_block_spec(config, layer_idx, family)
        shared = SharedExperts.Config(**s["shared_experts"]) if s["shared_experts"] else None
        return cls.Config(num_experts=s["num_experts"], hidden_size=s["hidden_size"], router=Router.Config(**s["router"]),
                          experts=GroupedExperts.Config(**s["experts"]), shared_experts=shared)

    @classmethod
    def from_hf_config(cls, config, layer_idx: int | None = None, *, family: str | None = None, dtype=None,
                       device=None, ep_group=None, **overrides) -> "MoE":
        """Build the MoE block of layer ``layer_idx`` (None: any MoE layer) of a Hugging Face config;
        ``overrides`` replace top-level :class:`MoE.Config` fields (e.g. ``backend=``, ``aux_loss=``)."""
        cfg = cls.config_from_hf(config, layer_idx, family)
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        return cfg.build(dtype=dtype, device=device, ep_group=ep_group)

    def load_hf_state_dict(self, state_dict, prefix: str = "", strict: bool = True) -> None:
        """Load this block's tensors from a Hugging Face checkpoint; see :func:`mojo_opset.hf.load_hf_state_dict`."""
        from ..hf.checkpoint import load_hf_state_dict

        load_hf_state_dict(self, state_dict, prefix, strict=strict)

    def quantize(self, scheme: str, group_size: int | None = None) -> None:
        """Quantize the routed experts (``mo.quantize_experts``); later forwards run
        ``mo.quant_moe_forward``.  The float ``experts`` stay as the source (and for training);
        ``self.quantized = None`` goes back to them.  The quantized tensors live on the experts'
        device: quantize again after moving the module."""
        from ..quant import quantize_experts

        with torch.no_grad():
            self.quantized = quantize_experts(self.experts.gate_up_proj.detach(), self.experts.down_proj.detach(),
                                              scheme, group_size=group_size)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *, forced_expert_ids: torch.Tensor | None = None,
                return_router_info: bool = False):
        """``y`` shaped like ``x [..., H]`` (and the router info dict with ``return_router_info``)."""
        cfg = self.config
        shared = self.shared_experts.weights() if self.shared_experts is not None else (None, None, None)
        common = dict(**self.gate.routing_kwargs(), forced_expert_ids=forced_expert_ids,
                      shared_w13=shared[0], shared_w2=shared[1], shared_gate=shared[2], ep_group=self.ep_group,
                      ep_mode=cfg.ep_mode, return_router_info=True, backend=cfg.backend)
        if self.quantized is not None:
            from ..functional.quant_forward import quant_moe_forward

            y, info = quant_moe_forward(x, self.gate.weight, self.quantized, self.top_k,
                                        activation=self.experts.config.activation, **common)
        else:
            y, info = moe_forward(x, self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj,
                                  self.top_k, activation=self.experts.config.activation, **common)
        # plain attributes: skip nn.Module.__setattr__'s parameter/buffer/module checks (µs per call)
        vars(self).update(last_topk_ids=info["topk_ids"], last_tokens_per_expert=info["tokens_per_expert"])
        if self.training:
            # a forward recomputed by checkpointing computes the losses again (non-reentrant
            # checkpointing needs every tensor the original forward saved) but leaves the state alone
            losses = self._aux_losses(x, info) if torch.is_grad_enabled() else {}
            if not in_backward():
                with torch.no_grad():
                    self.expert_load.add_(info["tokens_per_expert"])
                self.last_aux_losses = losses
        return (y, info) if return_router_info else y

    def _aux_losses(self, x, info) -> dict:
        cfg, out = self.config, {}
        if cfg.aux_loss is not None and cfg.aux_loss_coeff > 0:
            scores, ids = info["scores"], info["topk_ids"]
            if cfg.aux_loss == "switch":
                loss = _losses.load_balancing_loss(scores, ids)
            elif cfg.aux_loss == "sequence":
                loss = _losses.sequence_load_balancing_loss(scores, ids, x.shape[-2] if x.dim() >= 3 else ids.shape[0])
            else:
                loss = _losses.global_load_balancing_loss(scores, ids, self.balance_group)
            out["load_balancing"] = cfg.aux_loss_coeff * loss
        if cfg.z_loss_coeff > 0:
            # the router info carries the logits: no second router GEMM
            out["z"] = cfg.z_loss_coeff * _losses.router_z_loss(info["logits"])
        return out

    @torch.no_grad()
    def update_expert_bias(self, rate: float | None = None, group=None) -> torch.Tensor:
        """Aux-loss-free balancing step: ``gate.expert_bias += rate * sign(mean_load - load)`` with the
        loads accumulated by the training forwards since the last update (summed over ``group``, or
        the module's ``balance_group``); then the accumulator is reset.  Returns the bias."""
        if self.gate.expert_bias is None:
            raise RuntimeError("update_expert_bias needs Router.Config(expert_bias=True)")
        rate = self.config.bias_update_rate if rate is None else rate
        group = self.balance_group if group is None else group
        _losses.expert_bias_update(self.gate.expert_bias, self.expert_load, rate, group=group)
        self.expert_load.zero_()
        return self.gate.expert_bias

    def extra_repr(self) -> str:
        return f"hidden_size={self.config.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}"
