"""The raw codec: the tensor's bytes as they are (lossless, no CPU work beyond one copy)."""

from __future__ import annotations

import math

import torch

from kvtier.codec.spec import CodecSpec
from kvtier.errors import CorruptObjectError

_NO_PARAMS = bytes(16)


class RawCodec:
    """Payload = the contiguous little-endian bytes of the canonical tensor."""

    name = "raw"
    codec_id = 1
    spec = "raw"
    params = _NO_PARAMS

    def __init__(self, spec: CodecSpec | None = None) -> None:
        pass  # raw has no options

    def encode(self, kv: torch.Tensor) -> memoryview:
        """The tensor's bytes; a view when the tensor is already contiguous on the CPU."""
        flat = kv.detach().cpu().contiguous().reshape(-1)
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
        if params is not None and params != _NO_PARAMS:
            raise CorruptObjectError("raw objects carry no codec parameters")
        elem = torch.empty((), dtype=dtype).element_size()
        expected = math.prod(shape) * elem
        if len(payload) != expected:
            raise CorruptObjectError(f"raw payload is {len(payload)} bytes, shape {shape} needs {expected}")
        if expected == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.frombuffer(payload, dtype=torch.uint8).view(dtype).view(shape).to(device)

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        """Zero: raw is lossless."""
        return torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
