"""Codecs turn a canonical chunk tensor into payload bytes and back.

Codecs register lazily by name (`name -> "module:Class"`); each has a stable numeric id written into
every stored object's header, so a reader never guesses how a payload was encoded.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from kvtier.errors import ConfigError


class Codec(Protocol):
    """Encode a canonical chunk tensor to bytes and decode it back."""

    name: str
    codec_id: int

    def encode(self, kv: torch.Tensor) -> memoryview:
        """Payload bytes of a CPU canonical tensor."""
        ...

    def decode(
        self, payload: bytes | bytearray | memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """Canonical tensor of `shape` and `dtype` from a payload produced by encode()."""
        ...


CODECS: dict[str, str] = {"raw": "kvtier.codec.raw:RawCodec"}
CODEC_IDS: dict[int, str] = {1: "raw"}


def get_codec(name: str) -> Codec:
    """Instantiate the codec registered under `name`."""
    if name not in CODECS:
        raise ConfigError(f"unknown codec {name!r}; available: {', '.join(CODECS)}")
    module, _, cls = CODECS[name].partition(":")
    codec: Codec = getattr(importlib.import_module(module), cls)()
    return codec
