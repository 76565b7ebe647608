"""Training helpers for MoE routers (SPEC §3.1 step 8): load-balancing losses, router z-loss and the
expert-bias update of aux-loss-free balancing.

Conventions: ``scores`` ``[T, E]`` are the router's fp32 scores (``info["scores"]`` of
``moe_forward(..., return_router_info=True)``), ``topk_ids`` ``[T, K]`` its chosen experts.  The
expert-count factors ``f`` carry no gradient (they come from a discrete choice); the gradient flows
through the mean scores ``P``.  Every loss equals 1.0 for perfectly balanced routing with uniform
scores, so a coefficient means the same thing whatever E and K are.
"""
from __future__ import annotations

import torch

from .validation import check_index_range, check_int, check_tensor, fail

__all__ = ["expert_counts", "load_balancing_loss", "sequence_load_balancing_loss", "global_load_balancing_loss",
           "router_z_loss", "expert_bias_update", "collect_aux_losses", "update_expert_biases"]


def _check_routing(scores, topk_ids):
    check_tensor("scores", scores, ndim=2)
    if not scores.dtype.is_floating_point:
        fail(f"scores must be a float tensor, got {scores.dtype}", TypeError)
    check_tensor("topk_ids", topk_ids, ndim=2, device=scores.device)
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        fail(f"topk_ids must have an integer dtype, got {topk_ids.dtype}", TypeError)
    if topk_ids.shape[0] != scores.shape[0]:
        fail(f"topk_ids must have one row per token: scores has {scores.shape[0]} rows, topk_ids {topk_ids.shape[0]}")
    # an id outside [0, E) would fail an index_add (IndexError, or a device assert) or, in the
    # sequence loss, count for another sequence's expert
    check_index_range("topk_ids", topk_ids, scores.shape[1])
    return scores.shape[0], scores.shape[1], topk_ids.shape[1]


def expert_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` int64: how many (token, slot) assignments each expert received (no host sync on a GPU)."""
    num_experts = check_int("num_experts", num_experts, lo=1)
    check_tensor("topk_ids", topk_ids)
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        fail(f"topk_ids must have an integer dtype, got {topk_ids.dtype}", TypeError)
    check_index_range("topk_ids", topk_ids, num_experts)
    return _counts(topk_ids, num_experts)


def _counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    flat = topk_ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=topk_ids.device)
    return counts.index_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(scores: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Switch / GShard auxiliary loss ``E * sum_e f_e * P_e`` (a 0-dim fp32 tensor).

    ``f_e``: the fraction of the T*K assignments routed to expert e; ``P_e``: the mean score of e
    over the tokens.  Hugging Face's ``load_balancing_loss_func`` (Mixtral, Qwen-MoE) counts
    ``f_e`` per token instead of per assignment, i.e. it equals ``top_k`` times this value.
    For sigmoid routers pass scores normalised per token if you want P to be a distribution."""
    T, E, K = _check_routing(scores, topk_ids)
    if T == 0:
        return scores.new_zeros((), dtype=torch.float32)
    f = _counts(topk_ids, E).float() / (T * K)
    P = scores.float().mean(dim=0)
    return E * (f * P).sum()


def sequence_load_balancing_loss(scores: torch.Tensor, topk_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, averaged over the sequences.

    Tokens are ``[B * seq_len]`` rows, sequence-major.  Per sequence: ``f_i = E / (K * S) *
    #(tokens choosing i)``, ``P_i = mean_t s'_{t,i}`` with the scores normalised per token
    (``s' = s / sum_j s_j``, as the paper does for its sigmoid affinities), loss ``sum_i f_i P_i``."""
    T, E, K = _check_routing(scores, topk_ids)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        fail(f"seq_len must be a positive int, got {seq_len!r}")
    if T % seq_len:
        fail(f"seq_len must divide the number of tokens T = {T}, got {seq_len}")
    if T == 0:
        return scores.new_zeros((), dtype=torch.float32)
    B = T // seq_len
    s = scores.float()
    s = s / (s.sum(dim=-1, keepdim=True) + 1e-20)
    P = s.view(B, seq_len, E).mean(dim=1)                                    # [B, E]
    seq_of = torch.arange(T, device=scores.device).repeat_interleave(K) // seq_len
    counts = torch.zeros(B * E, dtype=torch.float32, device=scores.device)
    counts.index_add_(0, seq_of * E + topk_ids.reshape(-1).long(), torch.ones(T * K, device=scores.device))
    f = counts.view(B, E) * (E / (K * seq_len))
    return (f * P).sum(dim=1).mean()


def global_load_balancing_loss(scores: torch.Tensor, topk_ids: torch.Tensor, group=None) -> torch.Tensor:
    """The Switch loss with ``f`` counted over the global batch: the expert counts and the number of
    assignments are all-reduced (summed) over ``group`` (a torch.distributed process group; None =
    the default group when one is initialised, else this process alone).

    Each rank returns ``E * sum_e f_e^global * P_e^local``.  With equal token counts per rank the
    mean of the ranks' values (what data-parallel gradient averaging computes) is the loss of the
    global batch; the all-reduce carries no gradient."""
    T, E, K = _check_routing(scores, topk_ids)
    stats = torch.cat([_counts(topk_ids, E), torch.tensor([T * K], device=scores.device)])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    elif group is not None:
        fail("global_load_balancing_loss got a group but torch.distributed is not initialised")
    total = stats[E].clamp_min(1).float()
    f = stats[:E].float() / total
    P = scores.float().mean(dim=0) if T else scores.new_zeros(E, dtype=torch.float32)
    return E * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: ``mean_t logsumexp(logits_t)^2`` (computed in fp32, or fp64 for fp64 logits)."""
    check_tensor("logits", logits, ndim=2)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=dtype)
    return torch.logsumexp(logits.to(dtype), dim=-1).square().mean()


@torch.no_grad()
def expert_bias_update(expert_bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float,
                       group=None) -> torch.Tensor:
    """Aux-loss-free balancing (DeepSeek-V3): ``expert_bias += rate * sign(mean_load - load)`` in place.

    Overloaded experts get a lower bias (chosen less), underloaded ones a higher one.  With
    ``group`` the loads are summed over that process group first, so every rank applies the same
    update.  Returns ``expert_bias``."""
    check_tensor("expert_bias", expert_bias, ndim=1)
    E = expert_bias.shape[0]
    check_tensor("tokens_per_expert", tokens_per_expert, shape=(E,), device=expert_bias.device)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0:
        fail(f"rate must be a non-negative float, got {rate!r}")
    load = tokens_per_expert.to(torch.float32)
    if group is not None:
        import torch.distributed as dist

        load = load.clone()
        dist.all_reduce(load, op=dist.ReduceOp.SUM, group=group)
    err = load.mean() - load
    expert_bias.add_(torch.sign(err).to(expert_bias.dtype), alpha=float(rate))
    return expert_bias


def collect_aux_losses(model: torch.nn.Module) -> torch.Tensor:
    """Sum of the coefficient-weighted auxiliary losses of every MoE module's last training forward
    (``MoE.last_aux_losses``); add it to the training loss.  0 when none are configured."""
    total = None
    for m in model.modules():
        for v in (getattr(m, "last_aux_losses", None) or {}).values():
            total = v if total is None else total + v
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total


def update_expert_biases(model: torch.nn.Module, rate: float | None = None, group=None) -> int:
    """Apply :meth:`MoE.update_expert_bias` to every MoE module with an expert bias (after the optimizer
    step); returns how many were updated."""
    n = 0
    for m in model.modules():
        fn = getattr(m, "update_expert_bias", None)
        if fn is not None and getattr(getattr(m, "gate", None), "expert_bias", None) is not None:
            fn(rate=rate, group=group)
            n += 1
    return n
