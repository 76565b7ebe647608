"""Expert parallelism (SPEC §3.5): the MoE forward over a ``torch.distributed`` process group.

Rank r of W owns a contiguous slice of the E experts (the first ``E % W`` ranks one more).  Each
rank routes its own tokens; the ``allgather`` or ``alltoall`` exchange brings the (token, slot)
pairs to the ranks owning their experts and the results back.  See docs/distributed.md.
"""
from __future__ import annotations

from .agreement import EPCall, agree
from .exchange import allgather_forward, alltoall_forward
from .layout import expert_owner, expert_ranges, local_expert_range

__all__ = ["EPCall", "agree", "ep_forward", "expert_owner", "expert_ranges", "local_expert_range"]


def ep_forward(call: EPCall, x2, ids, weights, experts_fn):
    """Routed-expert output ``[T, H]`` of this rank's tokens; ``call`` comes from :func:`agree`.

    ``experts_fn(rows, local_ids, weights, expert_offset)`` computes this rank's experts for rows
    of K=1 (``local_ids`` int32 ``[R, 1]`` in ``[0, E_local)``, ``weights`` fp32 ``[R, 1]``)."""
    run = allgather_forward if call.mode == "allgather" else alltoall_forward
    return run(call, x2, ids, weights, experts_fn)
