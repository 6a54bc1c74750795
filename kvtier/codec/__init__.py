"""Codecs turn a canonical chunk tensor into payload bytes and back.

Codecs register lazily by name (`kvtier.codec.spec.CODECS`: name -> "module:Class", header id and
options). A spec names a codec and its options (`kivi-2:group=32`); every stored object's header
carries the codec id and PARAMS_SIZE bytes of codec parameters, so a reader never guesses how a
payload was encoded. Codecs compute with torch on the tensor's device (a GPU when the KV is there);
entropy coding (cachegen) runs on the CPU.

| spec | what | size vs bf16 |
|---|---|---|
| `raw` | the tensor's bytes | 1x (of the engine's dtype) |
| `fp8` (`fp8-e4m3`), `fp8-e5m2` | float8 with fp32 scales per channel (`scale=channel`) or per token | ~2x |
| `kivi-2`, `kivi-4` | asymmetric 2/4-bit: keys per channel, values per token, `group=` values | ~6.4x, ~3.2x |
| `cachegen` | layer-group bits, anchor deltas, range coding | ~4-5x (measured) |
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from kvtier.codec.spec import CODEC_IDS, CODECS, CodecSpec, canonical, parse_spec

PARAMS_SIZE = 16  # bytes of codec parameters in every object header (raw: its memory order)


class Codec(Protocol):
    """Encode a canonical chunk tensor to bytes and decode it back."""

    name: str  # registered name ("kivi-2")
    codec_id: int  # header id of the codec family
    spec: str  # canonical spec with every option ("kivi-2:group=64"): part of key namespaces
    params: bytes  # PARAMS_SIZE bytes: this codec's parameters (what decode assumes when given None)

    def params_for(self, kv: torch.Tensor) -> bytes:
        """The PARAMS_SIZE bytes written into the header of `kv`'s payload (raw adds its memory order)."""
        ...

    def encode(self, kv: torch.Tensor) -> memoryview:
        """Payload bytes of a canonical tensor (computed on its device)."""
        ...

    def decode(
        self,
        payload: bytes | bytearray | memoryview,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        params: bytes | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Canonical tensor of `shape` and `dtype` from a payload that encode() produced with
        `params` (those of a stored header; None: this codec's own), computed on and returned on
        `device` (None: the CPU; the tiers decode on the CPU). CorruptObjectError if invalid."""
        ...

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        """The documented bound of |decode(encode(kv)) - kv|, elementwise (float32)."""
        ...


def get_codec(spec: str | CodecSpec) -> Codec:
    """Instantiate the codec that `spec` names ("raw", "kivi-2:group=32", ...)."""
    parsed = spec if isinstance(spec, CodecSpec) else parse_spec(spec)
    module, _, cls = parsed.info.target.partition(":")
    codec: Codec = getattr(importlib.import_module(module), cls)(parsed)
    return codec


__all__ = ["CODECS", "CODEC_IDS", "PARAMS_SIZE", "Codec", "CodecSpec", "canonical", "get_codec", "parse_spec"]
