"""The per-expert loop of the reference experts: any device and dtype; reads group sizes on the host."""
from __future__ import annotations

import torch.nn.functional as F

from . import invariant
from .swiglu import swiglu


def experts_loop(permuted_x, group_ends, w13, w2, activation="swiglu", deterministic=False):
    """``deterministic``: each row's bits independent of the other rows of its expert (fixed-shape
    GEMM blocks, :mod:`.invariant`), in the forward and in the input gradient."""
    linear = invariant.linear if deterministic else F.linear
    R, dtype = permuted_x.shape[0], permuted_x.dtype
    y = permuted_x.new_zeros(R, w2.shape[1])
    ends = group_ends.tolist()
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            xs = permuted_x[start:end]
            a = swiglu(linear(xs, w13[e].to(dtype)), dtype)
            y[start:end] = linear(a, w2[e].to(dtype))
        start = end
    return y
