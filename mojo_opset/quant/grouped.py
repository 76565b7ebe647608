"""Expert groups of expert-sorted rows as device tensors, built from ``group_ends`` without host reads.

* :func:`row_experts`: each row's expert (E for rows past ``group_ends[-1]``).
* :func:`make_tiles`: the rows cut into tiles of ``m`` rows that each belong to one expert (an
  expert's rows ``[start, end)`` give tiles ``start, start+m, ...``, the last one partial).  How many
  tiles there are depends on the group sizes, but never exceeds :func:`tile_bound` (a function of
  R, E and m only), so a fixed number of tiles covers every routing: unused tiles and the padding
  positions of partial tiles read row 0 and write to a scratch row R.  Every valid row sits in
  exactly one tile.  A batched GEMM over tiles (``bmm`` of ``[tiles, m, K]`` rows against
  ``[tiles, N, K]`` weights gathered by each tile's expert) then serves all experts at once.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

BUDGET = 1 << 30        # bytes of the intermediates of one chunk of tiles (or of experts' weights)


def row_experts(group_ends: torch.Tensor, rows: int) -> torch.Tensor:
    """int64 ``[rows]``: the expert of each expert-sorted row; E for rows past ``group_ends[-1]``."""
    ends = group_ends.to(torch.int64)
    return torch.searchsorted(ends, torch.arange(rows, device=ends.device), right=True)


def tile_bound(R: int, E: int, m: int) -> int:
    """The most tiles of ``m`` rows that R rows in E groups need: sum_e ceil(n_e / m) with at most
    min(E, R) non-empty groups."""
    return (R + (m - 1) * min(E, R)) // m


def tile_height(R: int, E: int, cap: int = 256) -> int:
    """A tile height for R rows in E groups: the power of two at or below R / min(E, R) (the mean
    size of a non-empty group at most), so that padding stays below about R rows; at most ``cap``."""
    n = max(1, R // max(1, min(E, R)))
    return min(cap, 1 << (n.bit_length() - 1))


class Tiles(NamedTuple):
    m: int                  # rows per tile
    expert: torch.Tensor    # int64 [T]: each tile's expert (unused tiles: a valid expert id, no rows)
    src: torch.Tensor       # int64 [T, m]: the row each position reads (padding: row 0)
    dest: torch.Tensor      # int64 [T, m]: the row each position writes (padding: R, a scratch row)

    def chunks(self, per_tile: int, step: int | None = None):
        """Slices of consecutive tiles whose intermediates take about BUDGET bytes (``per_tile`` bytes
        each), or of ``step`` tiles."""
        T = self.expert.shape[0]
        step = step or max(1, BUDGET // max(1, per_tile))
        return [slice(t, min(T, t + step)) for t in range(0, T, step)]


def make_tiles(group_ends: torch.Tensor, R: int, m: int, multiple: int = 1) -> Tiles:
    """Tiles of ``m`` rows over the groups; their number is :func:`tile_bound` rounded up to
    ``multiple`` (so that chunks of ``multiple`` tiles all have one shape)."""
    E = group_ends.shape[0]
    dev = group_ends.device
    ends = group_ends.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    per = (ends - starts + m - 1) // m                  # tiles of each expert
    last = per.cumsum(0)                                # one past each expert's last tile
    T = -(-tile_bound(R, E, m) // multiple) * multiple
    t = torch.arange(T, device=dev)
    expert = torch.searchsorted(last, t, right=True).clamp_(max=E - 1)
    row0 = starts[expert] + (t - (last[expert] - per[expert])) * m
    n = (ends[expert] - row0).clamp(0, m)               # valid rows of each tile (0 for unused tiles)
    rows = row0.unsqueeze(1) + torch.arange(m, device=dev)
    valid = torch.arange(m, device=dev) < n.unsqueeze(1)
    return Tiles(m, expert, torch.where(valid, rows, 0), torch.where(valid, rows, R))
