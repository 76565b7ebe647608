"""'Did you mean' suggestions for misspelled names (backends, ops, options)."""
from __future__ import annotations

import difflib
from typing import Iterable


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name`` (case-insensitive), or None when nothing is close."""
    cands = list(candidates)
    lowered = {c.lower(): c for c in cands}
    hit = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hit[0]] if hit else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` or ``""``."""
    hit = closest(name, candidates)
    return f" (did you mean {hit!r}?)" if hit else ""
