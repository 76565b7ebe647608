"""Plain-text tables for the command-line reports, kept within a terminal's width.

A table wider than ``WIDTH`` narrows its wrappable columns and wraps their cells onto continuation
lines at commas and spaces; the JSON reports keep every text in full.
"""
from __future__ import annotations

import re

WIDTH = 100        # the widest line a report prints
_MIN_WRAP = 10     # a wrapped column is never narrowed below this
_WORD = re.compile(r"[^,; ]*(?:[,;] ?| |$)")   # a word with the separator that follows it


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


def wrap_text(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters, broken after a comma, semicolon or space where
    possible (a longer word is cut)."""
    if len(text) <= width:
        return [text]
    lines, cur = [], ""
    for tok in _WORD.findall(text):
        if not tok:
            continue
        if len(cur) + len(tok.rstrip()) > width and cur:
            lines.append(cur.rstrip())
            cur = ""
        while len(tok.rstrip()) > width:
            lines.append(tok[:width])
            tok = tok[width:]
        cur += tok
    if cur.strip():
        lines.append(cur.rstrip())
    return lines or [""]


def _words(text: str) -> list[str]:
    return [t.rstrip() for t in _WORD.findall(text) if t.strip()]


def render(headers: list[str], rows: list[list], right: set[int] | None = None, width: int | None = WIDTH,
           wrap: set[int] | None = None, notes: list[str | None] | None = None, note_indent: int = 4) -> str:
    """Left-aligned columns (``right``: indices of right-aligned ones), a rule under the header.

    When the table is wider than ``width``, the columns in ``wrap`` (indices) are narrowed, the
    one with the most room first, until it fits (down to their longest word, then cutting words,
    never below their header); their cells then take several lines.  ``notes[k]``, when given, is
    printed under row k, indented by ``note_indent`` and wrapped to ``width``."""
    right, wrap = right or set(), wrap or set()
    cells = [[str(h) for h in headers]] + [[fmt_num(c) if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if width is not None:
        # first down to each column's longest word, then, if that is not enough, cutting words
        words = {i: max([_MIN_WRAP, len(headers[i])] + [len(t) for r in cells[1:] for t in _words(r[i])])
                 for i in wrap}
        for floor in (words, {i: max(_MIN_WRAP, len(headers[i])) for i in wrap}):
            while sum(widths) + 2 * (len(widths) - 1) > width:
                shrinkable = [i for i in wrap if widths[i] > floor[i]]
                if not shrinkable:
                    break
                widths[max(shrinkable, key=lambda i: widths[i] - floor[i])] -= 1

    def lines(r):
        parts = [wrap_text(c, widths[i]) if i in wrap else [c] for i, c in enumerate(r)]
        out = []
        for k in range(max(len(p) for p in parts)):
            row = [p[k] if k < len(p) else "" for p in parts]
            out.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        return out

    out = lines(cells[0]) + ["  ".join("-" * w for w in widths)]
    for k, r in enumerate(cells[1:]):
        out += lines(r)
        if notes and notes[k]:
            out += wrap_lines(notes[k], width or 10**6, indent=note_indent, hang=2)
    return "\n".join(out)


def wrap_lines(text: str, width: int = WIDTH, indent: int = 0, hang: int = 4) -> list[str]:
    """A long report line wrapped to ``width``: the first line indented by ``indent``, the rest by
    ``indent + hang``."""
    first = wrap_text(text, width - indent)
    if len(first) == 1:
        return [" " * indent + text]
    rest = wrap_text(text[len(first[0]):].lstrip(), width - indent - hang)
    return [" " * indent + first[0]] + [" " * (indent + hang) + ln for ln in rest]


def say(text: str, indent: int = 0, file=None) -> None:
    """Print one report line, wrapped to the report width."""
    print("\n".join(wrap_lines(text, indent=indent)), file=file)
