"""The few exception types kvtier raises, and the "did you mean" hint their messages share.

A cache miss is never an exception: lookups return 0 and retrieves return an empty tensor.
Exceptions are for programming and configuration errors the caller must fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KVTierError(Exception):
    """Base class of every kvtier error."""


class ConfigError(KVTierError, ValueError):
    """A configuration key is unknown or its value is invalid."""


class LayoutError(KVTierError, ValueError):
    """A KV tensor does not match the layout it is stored or read under."""


class TokenError(KVTierError, ValueError):
    """Token ids are malformed (wrong type, negative, or too large)."""


class CorruptObjectError(KVTierError):
    """A stored object failed validation (bad magic, header, length or checksum)."""


class CodecError(KVTierError, ValueError):
    """A codec cannot encode a tensor (a lossy codec and KV with infinite or NaN values)."""


class TierError(KVTierError):
    """A storage tier could not complete an operation (I/O error, full disk, server down)."""


def closest(word: str, choices: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest choice, or "" when none is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
