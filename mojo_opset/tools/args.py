"""Parsing the tools' comma-separated options, and the usage error for a misspelled name."""
from __future__ import annotations


def parse_list(text: str | None, conv=str) -> list | None:
    """``"a, b,"`` -> ``["a", "b"]`` (each converted by ``conv``); None for an empty option."""
    return [conv(t.strip()) for t in text.split(",") if t.strip()] if text else None


def unknown_name(option: str, kind: str, name: str, valid) -> str:
    """``--backends: unknown backend 'tritn' (did you mean 'triton'?); expected one of: ...``."""
    from mojo_opset.suggest import did_you_mean

    valid = list(valid)
    return f"{option}: unknown {kind} {name!r}{did_you_mean(name, valid)}; expected one of: {', '.join(valid)}"
