"""Property checks shared by the fuzz tests: routing agreement up to near-ties, output closeness."""
from __future__ import annotations

import torch

# Every backend receives the same logits (the router GEMM is core code), so kernels differ from the
# reference only in how they evaluate softmax/sigmoid and sums: choice values closer than this may
# legitimately be ordered differently.
TIE_EPS = 1e-5
TOLERANCE = {torch.float32: (2e-4, 2e-3), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}


def near_tie_rows(scores: torch.Tensor, K: int, expert_bias, groups: int, kept) -> torch.Tensor:
    """Rows where the reference's ordering of the top K+1 choices (or of the group boundary) is
    decided by less than TIE_EPS."""
    T, E = scores.shape
    choice = scores.double() + (0 if expert_bias is None else expert_bias.double())
    # NaN ranks as -inf for the gaps; +-inf stay infinite (nan_to_num would make them the largest
    # finite values, whose equal neighbours would pass for near-ties): an infinite gap is no tie, and
    # equal infinities must be ordered exactly (lower id first, NaN last)
    choice = torch.where(torch.isnan(choice), float("-inf"), choice)
    top = choice.sort(dim=1, descending=True).values[:, : min(K + 1, E)]
    gaps = top[:, :-1] - top[:, 1:]
    finite = torch.isfinite(top[:, :-1]) & torch.isfinite(top[:, 1:])
    if gaps.numel():
        tie = ((gaps.abs() < TIE_EPS) & finite).any(dim=1)
    else:
        tie = torch.zeros(T, dtype=torch.bool, device=scores.device)
    if groups > 1 and kept is not None and kept < groups:
        g = choice.view(T, groups, E // groups)
        gs = torch.cat([g.max(-1).values.unsqueeze(-1),
                        (g.topk(min(2, E // groups), -1).values.sum(-1)).unsqueeze(-1)], -1)
        for col in range(2):
            s = gs[..., col].sort(dim=1, descending=True).values
            d = s[:, kept - 1] - s[:, kept]
            tie |= (d.abs() < 2 * TIE_EPS) & torch.isfinite(d)
    return tie.to(scores.device)


def assert_ids_valid(ids: torch.Tensor, E: int, K: int, where: str):
    assert ids.dtype == torch.int32, f"{where}: ids dtype {ids.dtype}"
    assert ids.shape[1] == K, f"{where}: ids shape {tuple(ids.shape)}"
    if ids.numel():
        assert int(ids.min()) >= 0 and int(ids.max()) < E, f"{where}: ids out of [0, {E})"
        s = ids.sort(dim=1).values
        assert not (s[:, 1:] == s[:, :-1]).any(), f"{where}: repeated expert in a row"


def assert_close_rows(got: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor, dtype, where: str):
    """Compare the selected rows with the dtype's tolerance scaled by the reference's magnitude."""
    if not bool(rows.any()):
        return
    g, r = got.detach()[rows].float(), ref.detach()[rows].float()
    atol, rtol = TOLERANCE[dtype]
    scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
    err = (g - r).abs()
    bad = err > atol * scale + rtol * r.abs()
    assert not bool(bad.any()), (f"{where}: {int(bad.sum())} of {bad.numel()} elements out of tolerance; "
                                 f"max abs err {float(err.max()):.3g} (atol {atol * scale:.3g}, rtol {rtol})")
