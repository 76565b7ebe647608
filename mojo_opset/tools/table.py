"""Plain-text tables for the command-line reports."""
from __future__ import annotations


def fmt_num(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def render(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """Left-aligned columns (``right``: indices of right-aligned ones), a rule under the header."""
    right = right or set()
    cells = [[str(h) for h in headers]] + [[fmt_num(c) if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)
