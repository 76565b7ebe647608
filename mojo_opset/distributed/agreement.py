"""Before any data moves, the ranks of an EP call agree on its configuration.

One all-gather of a fixed-size int64 fingerprint per call: each rank first validates its own
arguments (an error there is caught, not raised yet), then every rank learns whether some rank
rejected its arguments or differs in configuration, and all raise together -- a clear error on
every rank instead of a collective that hangs.  The same exchange carries each rank's token count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .collectives import all_gather_rows
from .layout import expert_ranges, group_rank_and_size

_MAGIC = 0x6D6F6A6F4550  # "mojoEP": tells our fingerprint from a stray collective's data
_DTYPES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_MODES = {"allgather": 1, "alltoall": 2}
# compared fields, in fingerprint order after (magic, failed)
_FIELDS = ("world size", "num_experts (gate_weight rows)", "top_k", "hidden size H", "ep_mode",
           "x dtype", "device type", "grad mode (torch.is_grad_enabled())")
_GRAD, _TOKENS = len(_FIELDS) + 2, len(_FIELDS) + 3   # per-rank fields, not compared


@dataclass(frozen=True)
class EPCall:
    """What every rank agreed on: its place in the group and all ranks' token counts."""
    group: object
    mode: str
    rank: int
    world: int
    num_experts: int
    top_k: int
    tokens: tuple[int, ...]
    needs_grad: bool          # some rank records gradients: every rank records the exchange

    @property
    def expert_range(self) -> tuple[int, int]:
        return expert_ranges(self.num_experts, self.world)[self.rank]

    def anchor(self, device) -> torch.Tensor | None:
        return torch.zeros((), device=device, requires_grad=True) if self.needs_grad else None


def _device_code(dev: torch.device) -> int:
    return {"cpu": 1, "cuda": 2, "npu": 3}.get(dev.type, 4)


def _comm_device(group, x) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _requires_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def agree(group, ep_mode, validate, x):
    """Run ``validate()`` -> ``(x2, opts, gate_weight, grad_tensors)`` on every rank, exchange the
    fingerprint, raise on every rank on any rejection or mismatch; returns ``(x2, opts, EPCall)``."""
    rank, world = group_rank_and_size(group)
    error = None
    fp = torch.zeros(_TOKENS + 1, dtype=torch.int64)
    fp[0] = _MAGIC
    try:
        x2, opts, gate_weight, grad_tensors = validate()
    except Exception as exc:  # raised below, after every rank knows this one failed
        error = exc
        fp[1] = 1
    else:
        fp[2:_GRAD] = torch.tensor([world, gate_weight.shape[0], opts.top_k, x2.shape[1],
                                    _MODES[ep_mode], _DTYPES[x2.dtype], _device_code(x2.device),
                                    int(torch.is_grad_enabled())])
        fp[_GRAD] = int(_requires_grad(grad_tensors))
        fp[_TOKENS] = x2.shape[0]
    table = [row.tolist() for row in all_gather_rows(fp.to(_comm_device(group, x))[None], group).cpu()]
    if error is not None:
        raise error
    strangers = [r for r, row in enumerate(table) if row[0] != _MAGIC]
    if strangers:
        raise RuntimeError(f"expert parallelism: ranks {strangers} of ep_group are not in the same moe_forward "
                           "call (a different collective answered); every rank must call it together")
    failed = [r for r, row in enumerate(table) if row[1]]
    if failed:
        raise ValueError(f"expert parallelism: rank(s) {failed} of ep_group rejected their arguments "
                         "(their error says why); every rank raises so that none waits for them")
    for i, name in enumerate(_FIELDS):
        values = [row[2 + i] for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"expert parallelism: the ranks of ep_group disagree on {name}: "
                             + ", ".join(f"rank {r} has {_describe(i, v)}" for r, v in enumerate(values)))
    call = EPCall(group=group, mode=ep_mode, rank=rank, world=world, num_experts=gate_weight.shape[0],
                  top_k=opts.top_k, tokens=tuple(row[_TOKENS] for row in table),
                  needs_grad=any(row[_GRAD] for row in table))
    return x2, opts, call


def _describe(field: int, value: int) -> str:
    if field == 4:
        return next(repr(k) for k, v in _MODES.items() if v == value)
    if field == 5:
        return next(str(k).replace("torch.", "") for k, v in _DTYPES.items() if v == value)
    if field == 6:
        return {1: "cpu", 2: "cuda", 3: "npu"}.get(value, "another device")
    return str(value)
