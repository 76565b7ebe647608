"""Which rank owns which experts: contiguous slices, the first ``E % W`` ranks one expert larger."""
from __future__ import annotations

import torch
import torch.distributed as dist


def expert_ranges(num_experts: int, world_size: int) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` per rank: rank r owns experts ``lo <= e < hi``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    base, extra = divmod(num_experts, world_size)
    ranges, lo = [], 0
    for r in range(world_size):
        hi = lo + base + (1 if r < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return ranges


def group_rank_and_size(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ep_group was given but torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("ep_group does not contain this process (dist.get_rank(ep_group) is -1)")
    return rank, dist.get_world_size(group)


def local_expert_range(num_experts: int, group) -> tuple[int, int]:
    """``(lo, hi)``: the experts this process owns in ``group`` (its w13/w2 are ``w[lo:hi]``)."""
    rank, world = group_rank_and_size(group)
    return expert_ranges(num_experts, world)[rank]


def expert_owner(ids: torch.Tensor, num_experts: int, world_size: int) -> torch.Tensor:
    """The rank owning each expert id (same shape as ``ids``, int64), without host synchronisation."""
    base, extra = divmod(num_experts, world_size)
    ids = ids.long()
    split = extra * (base + 1)                       # experts below this live on the larger ranks
    big = torch.div(ids, base + 1, rounding_mode="floor")
    small = extra + torch.div(ids - split, max(base, 1), rounding_mode="floor")
    return torch.where(ids < split, big, small)
