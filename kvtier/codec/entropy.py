"""Range coding of integer symbol streams with `constriction`, one stream per call.

Each stream is coded with its own categorical model: the symbol counts of the stream, trimmed to
the range of symbols it uses, stored next to the stream (u32 counts) so that the decoder builds
the identical model. One stream is one constriction call over a whole numpy array (vectorised in
Rust); streams are kept to about one layer's symbols so that no call holds the GIL for long.
Coded streams are whole u32 words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtier.errors import ConfigError, CorruptObjectError


def _constriction() -> Any:
    try:
        import constriction
    except ImportError as exc:  # a core dependency; only a broken install lacks it
        raise ConfigError("the cachegen codec needs the 'constriction' package: pip install constriction") from exc
    return constriction


@dataclass(frozen=True, slots=True)
class Stream:
    """One coded stream: its symbols' first value, their counts, and the coded words."""

    first: int  # the smallest symbol; the model covers first .. first + len(counts) - 1
    counts: np.ndarray  # uint32 occurrences of each symbol
    words: np.ndarray  # uint32 range-coder output

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes + self.words.nbytes


def histogram(symbols: np.ndarray) -> tuple[int, np.ndarray]:
    """(first symbol, uint32 counts of first .. last) of a non-empty int array."""
    first = int(symbols.min())
    counts = np.bincount(symbols - first).astype(np.uint32)
    return first, counts


def coded_bits(counts: np.ndarray) -> float:
    """Bits a stream with these symbol counts takes (its entropy plus its count table)."""
    nonzero = counts[counts > 0].astype(np.float64)
    total = nonzero.sum()
    return float(-(nonzero * np.log2(nonzero / total)).sum()) + 32 * len(counts) + 32


def _model(counts: np.ndarray) -> Any:
    return _constriction().stream.model.Categorical(counts.astype(np.float32), perfect=False)


def encode_stream(symbols: np.ndarray) -> Stream:
    """Range-code a non-empty int array with a model of its own histogram."""
    first, counts = histogram(symbols)
    encoder = _constriction().stream.queue.RangeEncoder()
    if len(counts) > 1:  # a one-symbol alphabet needs no bits
        encoder.encode((symbols - first).astype(np.int32, copy=False), _model(counts))
    return Stream(first, counts, encoder.get_compressed().astype(np.uint32, copy=False))


def decode_stream(stream: Stream, count: int) -> np.ndarray:
    """The `count` int32 symbols of a stream; CorruptObjectError if its model is malformed."""
    if len(stream.counts) == 0 or int(stream.counts.sum(dtype=np.uint64)) != count:
        raise CorruptObjectError(f"entropy table counts {int(stream.counts.sum())} symbols, expected {count}")
    if len(stream.counts) == 1:
        return np.full(count, stream.first, dtype=np.int32)
    c = _constriction()
    try:
        decoder = c.stream.queue.RangeDecoder(stream.words)
        symbols: np.ndarray = decoder.decode(_model(stream.counts), count)
    except (AssertionError, ValueError, RuntimeError, OverflowError) as exc:  # how constriction reports bad data
        raise CorruptObjectError(f"entropy-coded stream is invalid: {exc}") from None
    symbols += stream.first
    return symbols
