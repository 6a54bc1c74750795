"""The raw codec: the tensor's bytes as they are (lossless, no CPU work beyond one copy).

A chunk is stored in the memory order it comes in (see kvtier.layout): token-major (canonical,
parameters all zeros, as in every raw object before head-major ones existed) or head-major
(`[planes, layers, heads, tokens, dim]`; the first parameter byte is 1). Decoding gives back the
canonical shape as a view in the stored order, so a reader whose engine keeps heads together copies
whole blocks. Head-major objects are framed as format version 2 (see framing.py), which versions
of kvtier before them reject as corrupt: a miss (their tier deletes the object), never wrong KV.
"""

from __future__ import annotations

import math

import torch

from kvtier.codec.spec import CodecSpec
from kvtier.errors import CorruptObjectError
from kvtier.layout import is_head_major

TOKEN_MAJOR = bytes(16)
HEAD_MAJOR = b"\x01" + bytes(15)


class RawCodec:
    """Payload = the contiguous little-endian bytes of the chunk, token-major or head-major."""

    name = "raw"
    codec_id = 1
    spec = "raw"
    params = TOKEN_MAJOR

    def __init__(self, spec: CodecSpec | None = None) -> None:
        pass  # raw has no options

    def params_for(self, kv: torch.Tensor) -> bytes:
        """The header parameters of `kv`'s payload: its memory order."""
        return HEAD_MAJOR if is_head_major(kv) else TOKEN_MAJOR

    def encode(self, kv: torch.Tensor) -> memoryview:
        """The tensor's bytes in its memory order (head-major stays head-major, anything else is
        written token-major); a view when it is already contiguous on the CPU."""
        kv = kv.detach().cpu()
        flat = kv.transpose(2, 3).reshape(-1) if is_head_major(kv) else kv.contiguous().reshape(-1)
        return flat.view(torch.uint8).numpy().data

    def decode(
        self,
        payload: bytes | bytearray | memoryview,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        params: bytes | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A tensor sharing memory with `payload` (which must be writable and stay alive); a copy
        on `device` when one is given."""
        if params is not None and params not in (TOKEN_MAJOR, HEAD_MAJOR):
            raise CorruptObjectError(f"unknown raw memory order {params.hex()}")
        elem = torch.empty((), dtype=dtype).element_size()
        expected = math.prod(shape) * elem
        if len(payload) != expected:
            raise CorruptObjectError(f"raw payload is {len(payload)} bytes, shape {shape} needs {expected}")
        if expected == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        flat = torch.frombuffer(payload, dtype=torch.uint8).view(dtype)
        if params == HEAD_MAJOR:
            planes, layers, tokens, heads, dim = shape
            return flat.view(planes, layers, heads, tokens, dim).transpose(2, 3).to(device)
        return flat.view(shape).to(device)

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        """Zero: raw is lossless."""
        return torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
