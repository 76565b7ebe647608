"""Environment variables read on every call, at the cost of a dictionary lookup.

``os.environ.get`` encodes the name and decodes the value on each read (about half a microsecond);
the dispatcher and the backends read a handful of variables per op call, so they read the mapping
that ``os.environ`` itself writes through.  Changes made through ``os.environ`` (``monkeypatch.setenv``
included) are seen at the next call, exactly as with ``os.environ.get``.
"""
from __future__ import annotations

import functools
import os

__all__ = ["getenv", "env_flag", "env_int", "raw_values"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
_keys: dict[str, object] = {}


def getenv(var: str) -> str:
    """``os.environ.get(var, "")``."""
    data = getattr(os.environ, "_data", None)
    if data is None:     # another os.environ implementation: the plain read
        return os.environ.get(var, "")
    key = _keys.get(var)
    if key is None:
        key = _keys[var] = os.environ.encodekey(var)
    raw = data.get(key)
    if raw is None:
        return ""
    return raw if type(raw) is str else _decode(raw)


@functools.lru_cache(maxsize=256)
def _decode(raw) -> str:
    return os.environ.decodevalue(raw)


@functools.lru_cache(maxsize=256)
def _parse_flag(var: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{var} must be 1 or 0 (or true/false, yes/no, on/off), got {value!r}")


def env_flag(var: str, default: bool = False) -> bool:
    """A boolean environment variable (``default`` when unset or empty); anything but the usual
    spellings is an error, never ignored."""
    value = getenv(var)
    return _parse_flag(var, value) if value else default


@functools.lru_cache(maxsize=256)
def _parse_int(var: str, value: str, minimum: int) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        n = None
    if n is None or n < minimum:
        raise ValueError(f"{var} must be an integer >= {minimum}, got {value!r}")
    return n


def env_int(var: str, default: int, minimum: int = 0) -> int:
    """An integer environment variable (``default`` when unset or empty); anything else, or a value
    below ``minimum``, is an error, never ignored."""
    value = getenv(var)
    return _parse_int(var, value, minimum) if value else default


def raw_values(variables: tuple[str, ...]) -> tuple:
    """The stored values of several variables at once (None where unset), undecoded: a cache key
    that changes exactly when one of the variables does."""
    data = getattr(os.environ, "_data", None)
    if data is None:
        return tuple(map(getenv, variables))
    keys = _encoded.get(variables)
    if keys is None:
        keys = _encoded[variables] = tuple(map(os.environ.encodekey, variables))
    return tuple(map(data.get, keys))


_encoded: dict[tuple, tuple] = {}
