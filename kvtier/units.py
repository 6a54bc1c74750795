"""Parsing of human-written sizes ("4GiB", "512 MB", "1.5GiB") and booleans."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _SUFFIX[_p] = _SUFFIX[_p + "b"] = 1000**_i
    _SUFFIX[_p + "i"] = _SUFFIX[_p + "ib"] = 1024**_i

KiB, MiB, GiB = 1024, 1024**2, 1024**3


def parse_size(value: object) -> int:
    """Return a byte count from an int or a string like "4GiB" (binary) or "4GB" (decimal)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 4GiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    if isinstance(value, float):
        if value < 0 or value != value:
            raise ValueError(f"a size cannot be negative: {value}")
        return int(value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            number, suffix = match.groups()
            return int(float(number) * _SUFFIX[suffix.lower()])
    raise ValueError(f"expected a size such as 4GiB, 512MiB or 1000000, got {value!r}")


def format_size(n: float) -> str:
    """Format a byte count with a binary suffix, e.g. 6291456 -> "6.0 MiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(value: object) -> bool:
    """Return a bool from a bool or one of true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {value!r}")
