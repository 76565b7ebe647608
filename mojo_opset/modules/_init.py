"""Deterministic, device-independent parameter initialisation shared by the modules."""
from __future__ import annotations

import torch


def as_generator(seed_or_generator) -> torch.Generator:
    """A CPU generator from an int seed (or the given CPU generator, used as is)."""
    if isinstance(seed_or_generator, torch.Generator):
        if seed_or_generator.device.type != "cpu":
            raise ValueError("init_weights needs a CPU torch.Generator (values are drawn on the CPU "
                             f"so that every device gets the same weights), got one on {seed_or_generator.device}")
        return seed_or_generator
    if isinstance(seed_or_generator, bool) or not isinstance(seed_or_generator, int):
        raise TypeError(f"init_weights takes an int seed or a torch.Generator, got {type(seed_or_generator).__name__}")
    g = torch.Generator(device="cpu")
    g.manual_seed(seed_or_generator)
    return g


@torch.no_grad()
def normal_(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """Fill ``t`` with N(0, std^2) drawn in fp32 on the CPU, so the values do not depend on t's device/dtype."""
    t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(std))


def filled(cfg, **sizes):
    """A copy of dataclass ``cfg`` with the None-valued size fields set from ``sizes``.

    A size the config already holds must agree with the parent's, so a mismatch is an error, not a
    silent override."""
    import dataclasses

    updates = {}
    for name, value in sizes.items():
        if value is None:
            continue
        current = getattr(cfg, name)
        if current is None:
            updates[name] = value
        elif current != value:
            raise ValueError(f"{type(cfg).__qualname__}.{name} is {current} but the parent builds it with {value}")
    return dataclasses.replace(cfg, **updates) if updates else cfg


def require(cfg, *names):
    for name in names:
        v = getattr(cfg, name)
        if v is None:
            raise ValueError(f"{type(cfg).__qualname__}.{name} is not set: give it in the config or to build()")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{type(cfg).__qualname__}.{name} must be a positive int, got {v!r}")
