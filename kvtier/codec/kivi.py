"""KIVI-style asymmetric 2-bit and 4-bit quantization (Liu et al., ICML 2024).

Keys are quantized per channel: each channel's values over a group of `group` consecutive tokens
share one grid. Values are quantized per token: each token's values over a group of `group`
consecutive channels (head by head, H*D channels) share one grid. A grid is a float16 minimum and
step (see grid.py); codes are packed 4 (2-bit) or 2 (4-bit) to a byte. A trailing partial group is
padded by repeating its last token (keys) or channel (values) for the grid fit only; it costs no
payload. MLA layouts (one plane) are quantized like keys.

Parameters (16 header bytes): u8 version (1) | u8 bits (2 or 4) | u16 group | 12 zero bytes.
Payload: key codes | value codes | key mins | key steps | value mins | value steps (float16).
Size: bits + 32 / group bits per value, e.g. kivi-2 with group 64 is 2.5 bits (6.4x smaller than
bf16), kivi-4 with group 32 is 5 bits (3.2x).
Error bound: half a grid step per value, step = (max - min) / (2^bits - 1) of its group, widened
by float16 rounding (`grid.grid_bound`), plus rounding to the output dtype.
"""

from __future__ import annotations

import math
import struct

import torch

from kvtier.codec.grid import (
    OwnParams,
    as_dtype,
    dequantize,
    fit_grid,
    grid_bound,
    join,
    pack_bits,
    packed_size,
    quantize,
    rounding_bound,
    split,
    unpack_bits,
)
from kvtier.codec.spec import CodecSpec, parse_spec
from kvtier.errors import CorruptObjectError

_PARAMS = struct.Struct("<BBH12x")
_VERSION = 1


def _pad(x: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """`x` extended along `dim` to a multiple of `group` by repeating its last slice."""
    pad = (-x.shape[dim]) % group
    if not pad:
        return x
    last = x.narrow(dim, x.shape[dim] - 1, 1)
    reps = [1] * x.dim()
    reps[dim] = pad
    return torch.cat([x, last.repeat(reps)], dim)


def _key_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """[L, T, H, D] -> [L, T/group, group, H, D] (tokens padded)."""
    x = _pad(x, 1, group)
    return x.view(x.shape[0], -1, group, *x.shape[2:])


def _value_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """[L, T, H, D] -> [L, T, H*D/group, group] (channels padded)."""
    x = _pad(x.reshape(x.shape[0], x.shape[1], -1), 2, group)
    return x.view(x.shape[0], x.shape[1], -1, group)


class KIVICodec(OwnParams):
    """2- or 4-bit asymmetric quantization: keys per channel, values per token."""

    codec_id = 3

    def __init__(self, spec: CodecSpec | None = None) -> None:
        spec = spec or parse_spec("kivi-2")
        self.name = spec.name
        self.spec = str(spec)
        self.bits = int(spec.name.rpartition("-")[2])
        self.group = int(spec.option("group"))
        self.params = _PARAMS.pack(_VERSION, self.bits, self.group)

    def _grouped(self, kv: torch.Tensor, plane: int, bits_group: int) -> tuple[torch.Tensor, int]:
        """(plane's values in groups, the dim the groups reduce over)."""
        x = kv[plane].float()
        return (_key_groups(x, bits_group), 2) if plane == 0 else (_value_groups(x, bits_group), 3)

    def encode(self, kv: torch.Tensor) -> memoryview:
        """Codes and grids of both planes, computed on kv's device."""
        levels = (1 << self.bits) - 1
        codes, grids = [], []
        for plane in range(kv.shape[0]):
            groups, dim = self._grouped(kv, plane, self.group)
            lo, step = fit_grid(groups, dim, levels, self.name)
            q = quantize(groups, lo, step, levels)
            q = q.flatten(1, 2)[:, : kv.shape[2]] if plane == 0 else q.flatten(2)[:, :, : kv.shape[3] * kv.shape[4]]
            codes.append(pack_bits(q, self.bits))
            grids += [lo, step]
        return join(codes + grids)

    def decode(
        self,
        payload: bytes | bytearray | memoryview,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        params: bytes | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The canonical tensor of a payload; on `device` (default CPU) when given."""
        bits, group = self._params(self.params if params is None else params)
        planes, layers, tokens, heads, dim = shape
        count = layers * tokens * heads * dim
        grid_shapes = [_grid_shape(shape, plane, group) for plane in range(planes)]
        sizes = [packed_size(count, bits)] * planes + [2 * math.prod(s) for s in grid_shapes for _ in (0, 1)]
        sections = [s.to(device) for s in split(payload, sizes, self.name)]
        out = torch.empty(shape, dtype=dtype, device=device)
        for plane in range(planes):
            q = unpack_bits(sections[plane], bits, count).view(layers, tokens, heads, dim)
            lo_sec, step_sec = sections[planes + 2 * plane], sections[planes + 2 * plane + 1]
            lo = as_dtype(lo_sec, torch.float16, grid_shapes[plane])
            step = as_dtype(step_sec, torch.float16, grid_shapes[plane])
            _dequantize_plane(q, lo, step, plane, group, out[plane])
        return out

    def _params(self, params: bytes) -> tuple[int, int]:
        if len(params) != _PARAMS.size or params[4:] != bytes(12):
            raise CorruptObjectError("kivi parameters are malformed")
        version, bits, group = _PARAMS.unpack(params)
        if version != _VERSION or bits not in (2, 4) or not 2 <= group <= 4096:
            raise CorruptObjectError(f"kivi parameters: version {version}, bits {bits}, group {group}")
        return bits, group

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        """Half a grid step of each value's group, widened by float16 and output rounding."""
        levels = (1 << self.bits) - 1
        out = torch.empty(kv.shape, dtype=torch.float32, device=kv.device)
        for plane in range(kv.shape[0]):
            groups, dim = self._grouped(kv, plane, self.group)
            bound = grid_bound(groups, dim, levels)
            if plane == 0:
                out[plane] = bound.flatten(1, 2)[:, : kv.shape[2]]
            else:
                out[plane] = bound.flatten(2)[:, :, : kv.shape[3] * kv.shape[4]].view(out[plane].shape)
        return rounding_bound(kv.float(), out, kv.dtype)


def _grid_shape(shape: tuple[int, ...], plane: int, group: int) -> tuple[int, ...]:
    _, layers, tokens, heads, dim = shape
    if plane == 0:
        return (layers, -(-tokens // group), 1, heads, dim)
    return (layers, tokens, -(-(heads * dim) // group), 1)


def _dequantize_plane(
    q: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, plane: int, group: int, out: torch.Tensor
) -> None:
    """Write the values of plane codes `q` [L, T, H, D] into `out` (same shape)."""
    layers, tokens, heads, dim = q.shape
    if plane == 0:
        grouped = _pad(q, 1, group).view(layers, -1, group, heads, dim)
        values = dequantize(grouped, lo, step).flatten(1, 2)[:, :tokens]
    else:
        grouped = _pad(q.reshape(layers, tokens, -1), 2, group).view(layers, tokens, -1, group)
        values = dequantize(grouped, lo, step).flatten(2)[:, :, : heads * dim]
    out.copy_(values.reshape(out.shape))
