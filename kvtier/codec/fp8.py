"""fp8 codecs: float8 e4m3 or e5m2 values with float32 scales, per channel or per token.

`scale=channel`: one scale per (plane, layer, head, dim) channel over the chunk's tokens;
`scale=token`: one scale per (plane, layer, token, head) over the head's dims. Each scale maps the
group's largest magnitude to the format's largest finite value (448 for e4m3, 57344 for e5m2), so
nothing saturates. Decoding is one table lookup and one multiply per value.

Parameters (16 header bytes): u8 version (1) | u8 format (1 e4m3, 2 e5m2) | u8 axis (1 channel,
2 token) | 13 zero bytes. Payload: scales (float32) | codes (one byte per value).
Error bound (s = the group's scale): |x - x'| <= 2^-(m+1) |x| + 2^(e-m-1) s, with m mantissa bits
and e the smallest normal exponent (e4m3: 2^-4 |x| + 2^-10 s; e5m2: 2^-3 |x| + 2^-17 s), plus
float32 arithmetic (2^-21 |x|) and rounding to the output dtype.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from kvtier.codec.grid import OwnParams, as_dtype, check_finite, join, rounding_bound, split
from kvtier.codec.spec import CodecSpec, parse_spec
from kvtier.errors import CorruptObjectError

_PARAMS = struct.Struct("<BBB13x")
_VERSION = 1


@dataclass(frozen=True, slots=True)
class _Format:
    code: int
    dtype: torch.dtype
    max: float  # largest finite value
    mantissa: int  # explicit mantissa bits
    min_exp: int  # exponent of the smallest normal value


_FORMATS = {
    "fp8-e4m3": _Format(1, torch.float8_e4m3fn, 448.0, 3, -6),
    "fp8-e5m2": _Format(2, torch.float8_e5m2, 57344.0, 2, -14),
}
_BY_CODE = {f.code: f for f in _FORMATS.values()}
_AXES = {"channel": 1, "token": 2}


def _as_float16(codes: torch.Tensor, fmt: _Format) -> torch.Tensor:
    """float16 of fp8 codes, exact, with integer shifts (torch's fp8 casts are scalar on the CPU).

    e5m2 is the top byte of a float16. e4m3 bits shifted left by 7 are a float16 whose exponent
    bias is 8 too large (times 2^-8, subnormals included); the sign lands on bit 14 and moves to
    bit 15 by adding it to itself. The caller multiplies by 2^8."""
    h = codes.to(torch.int16)
    if fmt.code == 2:
        return (h << 8).view(torch.float16)
    h = h << 7
    h += h & 0x4000
    return h.view(torch.float16)


def _scale_dim(axis: int) -> int:
    return 2 if axis == 1 else 4  # channel: reduce over tokens; token: over head_dim


class FP8Codec(OwnParams):
    """float8 values (e4m3 or e5m2) with a float32 scale per channel or per token."""

    codec_id = 2

    def __init__(self, spec: CodecSpec | None = None) -> None:
        spec = spec or parse_spec("fp8")
        self.name = spec.name
        self.spec = str(spec)
        self.format = _FORMATS[spec.name]
        self.axis = _AXES[spec.option("scale")]
        self.params = _PARAMS.pack(_VERSION, self.format.code, self.axis)

    def _scales(self, x: torch.Tensor, fmt: _Format, axis: int) -> torch.Tensor:
        amax = x.abs().amax(_scale_dim(axis), keepdim=True)
        check_finite(amax, self.name)
        return torch.where(amax > 0, amax / fmt.max, torch.ones_like(amax))

    def encode(self, kv: torch.Tensor) -> memoryview:
        """Scales, then codes, computed on kv's device."""
        x = kv.float()
        scale = self._scales(x, self.format, self.axis)
        codes = (x / scale).clamp_(-self.format.max, self.format.max).to(self.format.dtype)
        return join([scale, codes.view(torch.uint8)])

    def decode(
        self,
        payload: bytes | bytearray | memoryview,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        params: bytes | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The canonical tensor of a payload; on `device` (default CPU) when given."""
        fmt, axis = self._params(self.params if params is None else params)
        scale_shape = list(shape)
        scale_shape[_scale_dim(axis)] = 1
        scale_sec, code_sec = split(payload, [4 * math.prod(scale_shape), math.prod(shape)], self.name)
        scale = as_dtype(scale_sec, torch.float32, scale_shape).to(device)
        if fmt.code == 1:
            scale = scale * 256.0  # see _as_float16
        values = _as_float16(code_sec.to(device), fmt).float().view(shape)
        return values.mul_(scale).to(dtype)

    def _params(self, params: bytes) -> tuple[_Format, int]:
        if len(params) != _PARAMS.size or params[3:] != bytes(13):
            raise CorruptObjectError("fp8 parameters are malformed")
        version, code, axis = _PARAMS.unpack(params)
        if version != _VERSION or code not in _BY_CODE or axis not in _AXES.values():
            raise CorruptObjectError(f"fp8 parameters: version {version}, format {code}, axis {axis}")
        return _BY_CODE[code], axis

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        """Relative half-ulp of the format plus half its subnormal spacing, times the scale."""
        fmt = self.format
        x = kv.float()
        scale = self._scales(x, fmt, self.axis)
        rel = 2.0 ** -(fmt.mantissa + 1) + 2.0**-21
        bound = x.abs() * rel + scale * 2.0 ** (fmt.min_exp - fmt.mantissa - 1)
        return rounding_bound(x, bound, kv.dtype)
