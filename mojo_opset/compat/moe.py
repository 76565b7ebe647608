"""``MojoMoE`` and ``MojoQuantMoE``: the original's whole MoE layers, thin layers over
:func:`mojo_opset.moe_forward` and :func:`mojo_opset.quant_moe_forward`.

They hold the original's submodules (``gating``, ``dispatch``, ``experts``, ``combine``) so the state
dict keys (``gating.gate_weight``, ``experts.up_proj_weight``, ...) and attribute paths are the
original's, and run the layer as one functional call (so fused kernels serve it).

Expert parallelism (``ep_size > 1``) follows the original's layout: rank ``ep_rank`` of ``ep_group``
(the default group when None) holds experts ``[ep_start, ep_end)`` (the first ``E % ep_size`` ranks
one more).  ``dp_input=True``: each rank passes its own tokens; this library's EP exchange gathers
them and reduce-scatters the results (ranks may hold different token counts here).
``dp_input=False``: every rank passes the same tokens; each rank routes a contiguous share of them
through the EP exchange and the shares' outputs are all-gathered, so every rank returns the whole
output (as the original's all-reduce did) while each expert runs each token once.  Gradients flow to
each rank's own share (the gathered shares of the other ranks are constants).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import expert_ranges
from ..functional import moe_forward, quant_moe_forward

from .dispatch_combine import MojoMoECombine, MojoMoEDispatch
from .experts import MojoExperts, check_activation
from .gating import MojoMoEGating, routing_kwargs
from .operator import MojoOperator, check_size
from .quant import MojoQuantExperts

__all__ = ["MojoMoE", "MojoQuantMoE"]


def _share_bounds(T: int, world: int) -> list[int]:
    """Row boundaries of ``world`` contiguous shares of T rows (the first ``T % world`` one longer)."""
    base, extra = divmod(T, world)
    out = [0]
    for r in range(world):
        out.append(out[-1] + base + (1 if r < extra else 0))
    return out


def _all_gather_rows(part: torch.Tensor, bounds: list[int], rank: int, group) -> torch.Tensor:
    """Concatenate every rank's share (``part`` is this rank's), keeping this rank's share in the graph."""
    world = len(bounds) - 1
    longest = max(bounds[r + 1] - bounds[r] for r in range(world))
    padded = part.new_zeros((longest, *part.shape[1:]))
    padded[:part.shape[0]] = part.detach()
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    shares = [pieces[r][:bounds[r + 1] - bounds[r]] for r in range(world)]
    shares[rank] = part
    return torch.cat(shares)


class _MoELayer(MojoOperator):
    """What MojoMoE and MojoQuantMoE share: sizes, the EP layout, routing, EP execution."""

    _op = "moe_forward"
    _mojo_routing_layer = True   # RouterReplay records / replays it by module name

    def _setup(self, num_experts, top_k, hidden_size, intermediate_size, activation, ep_size, ep_rank, ep_group,
               dp_input):
        cls = type(self).__name__
        check_activation(activation, cls)
        if intermediate_size is None:
            raise ValueError(f"{cls}: intermediate_size must be provided")
        self.num_experts = check_size("num_experts", num_experts)
        self.top_k = check_size("top_k", top_k)
        self.hidden_size = check_size("hidden_size", hidden_size)
        self.intermediate_size = check_size("intermediate_size", intermediate_size)
        self.ep_size = check_size("ep_size", ep_size)
        self.ep_rank = check_size("ep_rank", ep_rank, lo=0)
        if ep_rank >= ep_size:
            raise ValueError(f"ep_rank must lie in [0, ep_size = {ep_size}), got {ep_rank}")
        if not isinstance(dp_input, bool):
            raise TypeError(f"dp_input must be a bool, got {type(dp_input).__name__}")
        self.ep_group, self.dp_input = ep_group, dp_input
        self.ep_start, self.ep_end = expert_ranges(num_experts, ep_size)[ep_rank]
        self.num_experts_local = self.ep_end - self.ep_start
        self.activation = activation
        self.last_topk_ids: torch.Tensor | None = None

    def _submodules(self, experts_cls, experts_kwargs, factory):
        b = self._backend
        self.gating = MojoMoEGating._registry.get(b)(self.hidden_size, self.num_experts, self.top_k, **factory)
        self.dispatch = MojoMoEDispatch._registry.get(b)(self.num_experts, **factory)
        self.experts = experts_cls._registry.get(b)(self.num_experts_local, self.hidden_size, self.intermediate_size,
                                                    self.activation, **experts_kwargs, **factory)
        self.combine = MojoMoECombine._registry.get(b)(multiply_by_gates=True, **factory)

    def _group(self):
        """The EP process group, checked against ep_size / ep_rank."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"ep_size = {self.ep_size} needs torch.distributed to be initialized "
                               "(torch.distributed.init_process_group)")
        group = self.ep_group if self.ep_group is not None else dist.group.WORLD
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if world != self.ep_size or rank != self.ep_rank:
            raise ValueError(f"ep_size={self.ep_size}, ep_rank={self.ep_rank} do not match the process group "
                             f"(size {world}, this process is rank {rank})")
        return group

    def _run(self, run, hidden_states, forced_expert_ids):
        """``run(x, forced_expert_ids, ep_group)`` is the functional forward with router info."""
        if self.ep_size > 1 and not self.dp_input:
            y, ids = self._run_replicated(run, hidden_states, forced_expert_ids)
        else:
            y, info = run(hidden_states, forced_expert_ids, self._group() if self.ep_size > 1 else None)
            ids = info["topk_ids"]
        self.last_topk_ids = ids
        return y

    def _run_replicated(self, run, hidden_states, forced_expert_ids):
        """Every rank holds all T tokens: route this rank's share through the EP exchange, then
        all-gather the shares' outputs (and ids)."""
        group = self._group()
        x2 = hidden_states.reshape(-1, hidden_states.shape[-1])
        bounds = _share_bounds(x2.shape[0], self.ep_size)
        lo, hi = bounds[self.ep_rank], bounds[self.ep_rank + 1]
        forced = None
        if forced_expert_ids is not None:
            if not isinstance(forced_expert_ids, torch.Tensor) or forced_expert_ids.shape[:1] != x2.shape[:1]:
                raise ValueError(f"forced_expert_ids must have shape [T, top_k] = [{x2.shape[0]}, {self.top_k}], "
                                 f"got {getattr(forced_expert_ids, 'shape', type(forced_expert_ids).__name__)}")
            forced = forced_expert_ids[lo:hi]
        y_part, info = run(x2[lo:hi], forced, group)
        y = _all_gather_rows(y_part, bounds, self.ep_rank, group).reshape(hidden_states.shape)
        return y, _all_gather_rows(info["topk_ids"], bounds, self.ep_rank, group)

    def extra_repr(self) -> str:
        ep = f", ep_size={self.ep_size}, ep_rank={self.ep_rank}, dp_input={self.dp_input}" if self.ep_size > 1 else ""
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}{ep}")


class MojoMoE(_MoELayer, core=True):
    """``forward(hidden_states [T, H], forced_expert_ids=None)`` -> ``[T, H]``: softmax top-k routing
    with renormalised weights (fp32 router), SwiGLU experts, weighted combine.  ``forced_expert_ids
    [T, K]`` replays a routing; -1 keeps the natural choice for that slot."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int | None = None,
                 activation: str = "swiglu", ep_size: int = 1, ep_rank: int = 0, ep_group=None,
                 dp_input: bool = False, **kwargs):
        super().__init__(**kwargs)
        self._setup(num_experts, top_k, hidden_size, intermediate_size, activation, ep_size, ep_rank, ep_group,
                    dp_input)
        self._submodules(MojoExperts, {}, kwargs)

    def forward(self, hidden_states: torch.Tensor, forced_expert_ids: torch.Tensor | None = None) -> torch.Tensor:
        def run(x, forced, group):
            return moe_forward(x, self.gating.gate_weight.t(), self.experts.up_proj_weight,
                                  self.experts.down_proj_weight, self.top_k, activation=self.activation,
                                  ep_group=group, return_router_info=True, **routing_kwargs(self, forced))
        return self._run(run, hidden_states, forced_expert_ids)


class MojoQuantMoE(_MoELayer, core=True):
    """:class:`MojoMoE` with the original's quantized experts (:class:`MojoQuantExperts`)."""

    _op = "quant_moe_forward"

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int | None = None,
                 activation: str = "swiglu", quant_dtype: torch.dtype = torch.int8, up_quant_group_size: int = -1,
                 up_weight_dtype=torch.int8, down_quant_group_size: int = -1, down_weight_dtype=torch.int8,
                 ep_size: int = 1, ep_rank: int = 0, ep_group=None, dp_input: bool = False, **kwargs):
        super().__init__(**kwargs)
        if quant_dtype is not torch.int8:
            raise NotImplementedError(f"MojoQuantMoE: quant_dtype must be torch.int8, got {quant_dtype}")
        self._setup(num_experts, top_k, hidden_size, intermediate_size, activation, ep_size, ep_rank, ep_group,
                    dp_input)
        self.quant_dtype = quant_dtype
        self.up_quant_group_size, self.up_weight_dtype = up_quant_group_size, up_weight_dtype
        self.down_quant_group_size, self.down_weight_dtype = down_quant_group_size, down_weight_dtype
        quant = dict(quant_dtype=quant_dtype, up_quant_group_size=up_quant_group_size, up_weight_dtype=up_weight_dtype,
                     down_quant_group_size=down_quant_group_size, down_weight_dtype=down_weight_dtype)
        self._submodules(MojoQuantExperts, quant, kwargs)

    def forward(self, hidden_states: torch.Tensor, forced_expert_ids: torch.Tensor | None = None) -> torch.Tensor:
        def run(x, forced, group):
            return quant_moe_forward(x, self.gating.gate_weight.t(), self.experts.quantized_experts(), self.top_k,
                                        activation=self.activation, ep_group=group, return_router_info=True,
                                        **routing_kwargs(self, forced))
        return self._run(run, hidden_states, forced_expert_ids)
