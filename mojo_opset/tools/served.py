"""Which implementation served each op a call went through, from ``mo.last_served()``.

A case of ``compare`` (or a timed path of ``bench``) calls one op; that op may be served whole by
a backend's kernel, or, when the backend does not override it, by the reference composing other
dispatched ops (the MoE forward: gating, permute, experts, combine), each of which is served on
its own.  Reports name the op's own ``served_by`` and every part's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# the order parts are listed in
ORDER = ("moe_forward", "quant_moe_forward", "moe_gating", "moe_permute", "moe_experts", "moe_quant_experts",
         "moe_combine")
SHORT = {"moe_gating": "gating", "moe_permute": "permute", "moe_experts": "experts", "moe_combine": "combine",
         "moe_forward": "forward", "quant_moe_forward": "quant"}
# how a part's served_by reads in a table cell ("no override" and the reference both ran the reference)
_CELL = {"no override": "ref", "reference": "ref"}


@dataclass
class Served:
    served_by: str                                # the op's own: kernel | fallback | no override | reference
    parts: dict = field(default_factory=dict)     # every other op the call went through: served_by
    reasons: list = field(default_factory=list)   # fallback reasons of the op and its parts, "op: reason"
    records: dict = field(default_factory=dict)   # every op (own and parts): served_by and reasons, for JSON

    def parts_text(self) -> str:
        """``gating=kernel, permute=kernel, experts=ref, combine=kernel`` ("" when the call went
        through no other op); ``ref``: the reference ran it (no override)."""
        return ", ".join(f"{short(op)}={_CELL.get(self.parts[op], self.parts[op])}"
                         for op in sorted(self.parts, key=_rank))

    def label(self) -> str:
        """The op's own served_by, then its parts: ``no override (gating=kernel, ...)``."""
        parts = self.parts_text()
        return f"{self.served_by} ({parts})" if parts else self.served_by


def short(op: str) -> str:
    return SHORT.get(op, op.removeprefix("moe_"))


def _rank(op: str) -> int:
    return ORDER.index(op) if op in ORDER else len(ORDER)


def summarize(last: dict, op: str) -> Served:
    """A ``Served`` for a call of ``op`` from the records of ``mo.last_served()`` after it.

    An op with no record was not dispatched (the call failed before, or never reached it)."""
    own = last.get(op, {}).get("served_by", "not dispatched")
    parts = {o: rec.get("served_by", "?") for o, rec in last.items() if o != op}
    reasons = [f"{o}: {why}" for o in sorted(last, key=_rank) if last[o].get("served_by") == "fallback"
               for why in last[o].get("reasons", [])]
    records = {o: {"served_by": rec.get("served_by"), "reasons": list(rec.get("reasons", []))}
               for o, rec in sorted(last.items(), key=lambda kv: _rank(kv[0]))}
    return Served(own, parts, reasons, records)


def served_call(fn, op: str):
    """``(result, Served)``: run ``fn`` (one call of ``op``) with fresh dispatch records."""
    import mojo_opset as mo

    mo.reset_stats()
    out = fn()
    return out, summarize(mo.last_served(), op)
