"""Shared pieces of the lossy codecs: uniform asymmetric grids, bit packing, payload sections.

A grid covers a group of values with `levels + 1` evenly spaced points from `lo` to
`lo + levels * step`. `lo` and `step` are stored as float16, rounded *outwards* (lo down, step up),
and values are quantized against the stored (rounded) grid, so every value lies on its grid's span
and the round-trip error is at most half a stored step (see `grid_bound`). Everything here is
vectorised torch on the tensor's device; no per-value Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kvtier.errors import CodecError, CorruptObjectError


class OwnParams:
    """`params_for` of a codec that encodes every memory order of a chunk alike (the lossy ones):
    its header parameters are its own."""

    params: bytes

    def params_for(self, kv: torch.Tensor) -> bytes:
        """The header parameters of `kv`'s payload: this codec's own."""
        return self.params


_F16_TINY = 2.0**-24  # the smallest positive float16 (a subnormal): the least step a grid has
_F32_SLACK = 2.0**-21  # float32 arithmetic of quantize/dequantize, relative to the values' magnitude


def check_finite(values: torch.Tensor, what: str) -> None:
    """CodecError unless every element is finite (lossy codecs cannot represent inf or NaN)."""
    if not bool(torch.isfinite(values).all()):
        raise CodecError(f"{what}: KV holds infinite or NaN values, or values beyond the codec's float16 grids")


def _round_f16(x: torch.Tensor, down: bool) -> torch.Tensor:
    """float16 of `x` rounded toward -inf (down) or +inf, never to nearest."""
    h = x.to(torch.float16)
    wrong = h.float() > x if down else h.float() < x
    target = torch.full_like(h, -math.inf if down else math.inf)
    return torch.where(wrong, torch.nextafter(h, target), h)


def fit_grid(x: torch.Tensor, dim: int, levels: int | torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 (lo, step) of grids along `dim` of float32 `x` (kept as a size-1 dim)."""
    lo = x.amin(dim, keepdim=True)
    hi = x.amax(dim, keepdim=True)
    lo16 = _round_f16(lo, down=True)
    step16 = _round_f16(((hi - lo16.float()) / levels).clamp_min(_F16_TINY), down=False)
    check_finite(lo16, what)
    check_finite(step16, what)
    return lo16, step16


def quantize(x: torch.Tensor, lo16: torch.Tensor, step16: torch.Tensor, levels: int | torch.Tensor) -> torch.Tensor:
    """uint8 grid indices of float32 `x` (lo, step and tensor levels broadcast against it)."""
    q = (x - lo16.float()).div_(step16.float()).round_().clamp_(min=0)
    q = torch.minimum(q, levels) if isinstance(levels, torch.Tensor) else q.clamp_(max=levels)
    return q.to(torch.uint8)


def dequantize(q: torch.Tensor, lo16: torch.Tensor, step16: torch.Tensor) -> torch.Tensor:
    """float32 values of grid indices `q` (lo and step broadcast against q).

    In place on a fresh float32 tensor: torch's broadcasting addcmul is ~20x slower on the CPU."""
    return q.float().mul_(step16.float()).add_(lo16.float())


def grid_bound(x: torch.Tensor, dim: int, levels: int | torch.Tensor) -> torch.Tensor:
    """The documented error bound of grids along `dim`: half a step, step = (max - min) / levels,
    widened by the float16 rounding of min and of the step (2^-10 relative, 2^-24 absolute each),
    plus float32 arithmetic (2^-21 of the magnitude)."""
    lo = x.amin(dim, keepdim=True)
    hi = x.amax(dim, keepdim=True)
    step = (hi - lo + lo.abs() * 2.0**-10 + _F16_TINY) / levels * (1 + 2.0**-10) + _F16_TINY
    magnitude = torch.maximum(lo.abs(), hi.abs())
    return (step / 2 + magnitude * _F32_SLACK).expand_as(x)


def rounding_bound(x: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`bound` widened by rounding the decoded value to `dtype` (half an ulp of |x| + bound)."""
    if not dtype.is_floating_point or dtype == torch.float32:
        return bound
    half_ulp = torch.finfo(dtype).eps / 2
    return bound + (x.abs() + bound) * half_ulp


# --- bit packing ---------------------------------------------------------------------------------


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes < 2**bits (bits 1, 2, 4 or 8) into bytes, low bits first; zero-padded."""
    flat = codes.reshape(-1)
    per = 8 // bits
    if per == 1:
        return flat.contiguous()
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per)
    out = groups[:, 0].clone()
    for i in range(1, per):  # at most 8 whole-tensor operations
        out |= groups[:, i] << (bits * i)
    return out


_SPREAD: dict[tuple[int, torch.device], torch.Tensor] = {}


def _spread_table(bits: int, device: torch.device) -> torch.Tensor:
    """Per byte value, its 8 // bits codes as consecutive bytes, read as one int16 or int32."""
    key = (bits, device)
    if key not in _SPREAD:
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=device)
        table = (torch.arange(256, dtype=torch.uint8, device=device).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        _SPREAD[key] = table.contiguous().view(torch.int16 if per == 2 else torch.int32).view(-1)
    return _SPREAD[key]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` uint8 codes of bytes that pack_bits produced (one table lookup per byte)."""
    if bits == 8:
        return packed[:count]
    spread = _spread_table(bits, packed.device).index_select(0, packed.int())
    return spread.view(torch.uint8)[:count]


def packed_size(count: int, bits: int) -> int:
    """Bytes pack_bits produces for `count` codes."""
    per = 8 // bits
    return -(-count // per)


# --- payload sections ----------------------------------------------------------------------------


def join(parts: Sequence[torch.Tensor]) -> memoryview:
    """The bytes of tensors back to back, as one CPU buffer."""
    flat = [p.contiguous().reshape(-1).view(torch.uint8) for p in parts]
    return torch.cat(flat).cpu().numpy().data


def split(payload: bytes | bytearray | memoryview, sizes: Sequence[int], what: str) -> list[torch.Tensor]:
    """uint8 tensors of consecutive sections of `payload`; CorruptObjectError unless sizes add up."""
    if len(payload) != sum(sizes):
        raise CorruptObjectError(f"{what} payload is {len(payload)} bytes, its parameters need {sum(sizes)}")
    whole = torch.frombuffer(payload, dtype=torch.uint8) if len(payload) else torch.empty(0, dtype=torch.uint8)
    out, offset = [], 0
    for size in sizes:
        out.append(whole[offset : offset + size])
        offset += size
    return out


def as_dtype(section: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A section's bytes read as `dtype` of `shape` (copied when misaligned)."""
    elem = torch.empty((), dtype=dtype).element_size()
    if section.data_ptr() % elem:
        section = section.clone()
    return section.view(dtype).view(tuple(shape))
