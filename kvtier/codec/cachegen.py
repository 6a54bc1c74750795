"""CacheGen-style codec (Liu et al., SIGCOMM 2024): layer-group quantization, anchor deltas and
range coding, on the CPU (quantization runs with torch on the tensor's device).

1. Quantization. The layers split into up to four equal groups, first to last, each with its own
   bit width for keys (`kbits`) and for values (`vbits`); by default keys get 4 bits and values 3
   in the first and last thirds of the layers, which the built-in model tolerates best, and 4 in
   the middle third, which it does not (benchmarks/README.md). Keys use one
   grid per channel over the chunk's tokens, values one grid per token over its channels (the KIVI
   axes); grids are float16 (min, step) rounded outwards (grid.py).
2. Anchor deltas. Tokens form groups of `anchor`; a key's code in a non-anchor token is coded as the
   difference from the code of its group's first token (lossless, on the integer codes). With
   `delta=auto` the encoder does so per layer only where it makes the layer smaller; `on` always,
   `off` never. Value grids differ per token, so values are never delta-coded.
3. Entropy coding. Each (plane, layer) is one or two range-coded streams (`entropy.py`), each with
   the count table of its own symbols. An xxh3-64 of all codes lets the decoder prove that it
   rebuilt exactly what was encoded (a corrupt or misdecoded stream is a miss, never wrong KV).

Parameters (16 header bytes): u8 version (1) | u8 key groups | u8 value groups | u8 delta mode
(0 off, 1 on, 2 auto) | u16 anchor | 4 x u8 key bits | 4 x u8 value bits | 2 zero bytes.
Payload: key mins, key steps [L, C] | value mins, value steps [L, T] (float16) | u64 code checksum |
one 20-byte record per (plane, layer): u8 mode, 3 pad, then per stream u16 first symbol, u16 table
length, u32 words | the count tables (u32) | the coded streams (u32), in record order.
Error bound: half a grid step per value (as KIVI: `grid.grid_bound`), plus output rounding.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from kvtier.codec import entropy
from kvtier.codec.grid import (
    OwnParams,
    as_dtype,
    dequantize,
    fit_grid,
    grid_bound,
    join,
    quantize,
    rounding_bound,
    split,
)
from kvtier.codec.spec import CodecSpec, parse_spec
from kvtier.errors import CorruptObjectError

_PARAMS = struct.Struct("<BBBBH4s4s2x")
_VERSION = 1
_DELTA = {"off": 0, "on": 1, "auto": 2}
_RECORD = np.dtype(
    [("mode", "u1"), ("pad", "u1", 3), ("first0", "<u2"), ("len0", "<u2"), ("words0", "<u4"),
     ("first1", "<u2"), ("len1", "<u2"), ("words1", "<u4")]
)  # fmt: skip


def _bits_bytes(groups: tuple[int, ...]) -> bytes:
    return bytes(groups) + bytes(4 - len(groups))


class CacheGenCodec(OwnParams):
    """Layer-group quantization + anchor deltas + range coding."""

    codec_id = 4

    def __init__(self, spec: CodecSpec | None = None) -> None:
        spec = spec or parse_spec("cachegen")
        self.name = spec.name
        self.spec = str(spec)
        self.kbits = tuple(int(b) for b in spec.option("kbits").split("-"))
        self.vbits = tuple(int(b) for b in spec.option("vbits").split("-"))
        self.anchor = int(spec.option("anchor"))
        self.delta = spec.option("delta")
        self.params = _PARAMS.pack(
            _VERSION, len(self.kbits), len(self.vbits), _DELTA[self.delta], self.anchor,
            _bits_bytes(self.kbits), _bits_bytes(self.vbits),
        )  # fmt: skip

    # --- encoding --------------------------------------------------------------------------------

    def encode(self, kv: torch.Tensor) -> memoryview:
        """Grids, checksum, stream records, tables and streams of a canonical tensor."""
        planes, layers, tokens = kv.shape[:3]
        x = kv.float().reshape(planes, layers, tokens, -1)
        levels = _levels((self.kbits, self.vbits), planes, layers, x.device)
        q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        grids: list[torch.Tensor] = []
        for plane in range(planes):
            lv = levels[plane].view(layers, 1, 1)
            lo, step = fit_grid(x[plane], 1 if plane == 0 else 2, lv, self.name)
            q[plane] = quantize(x[plane], lo, step, lv)
            grids += [lo, step]
        codes = q.cpu().numpy()
        records = np.zeros(planes * layers, dtype=_RECORD)
        streams: list[entropy.Stream] = []
        for i, (plane, layer) in enumerate(np.ndindex(planes, layers)):
            mode, parts = self._segment(codes[plane, layer], plane, int(levels[plane, layer]))
            records[i]["mode"] = mode
            for j, stream in enumerate(parts):
                records[i][f"first{j}"], records[i][f"len{j}"] = stream.first, len(stream.counts)
                records[i][f"words{j}"] = len(stream.words)
            streams += parts
        checksum = np.frombuffer(xxhash.xxh3_64_digest(codes.data), dtype=np.uint8)
        tail = [checksum, records.view(np.uint8), *(s.counts for s in streams), *(s.words for s in streams)]
        return join([*grids, torch.from_numpy(np.concatenate([t.view(np.uint8) for t in tail]))])

    def _segment(self, codes: np.ndarray, plane: int, levels: int) -> tuple[int, list[entropy.Stream]]:
        """(mode, streams) of one layer's codes [T, C]: plain, or anchors + deltas (keys only)."""
        plain = codes.reshape(-1).astype(np.int32)
        if plane == 0 and self.delta != "off" and codes.shape[0] > 1:
            anchors, deltas = _anchor_deltas(codes, self.anchor, levels)
            if self.delta == "on" or _cost(anchors) + _cost(deltas) < _cost(plain):
                return 1, [entropy.encode_stream(anchors), entropy.encode_stream(deltas)]
        return 0, [entropy.encode_stream(plain)]

    # --- decoding --------------------------------------------------------------------------------

    def decode(
        self,
        payload: bytes | bytearray | memoryview,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        params: bytes | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The canonical tensor of a payload; dequantized on `device` (default CPU) when given."""
        kbits, vbits, anchor = _parse_params(self.params if params is None else params)
        planes, layers, tokens, heads, dim = shape
        grids, checksum, records, tables, words = _sections(payload, shape, self.name)
        levels = _levels((kbits, vbits), planes, layers, "cpu")
        codes = np.empty((planes, layers, tokens, heads * dim), dtype=np.uint8)
        cursor = [0, 0]
        for i, (plane, layer) in enumerate(np.ndindex(planes, layers)):
            segment = _Segment(plane, int(levels[plane, layer]), anchor, codes.shape[2:])
            codes[plane, layer] = segment.decode(records[i], tables, words, cursor)
        if xxhash.xxh3_64_digest(codes.data) != checksum:
            raise CorruptObjectError("cachegen codes do not match their checksum")
        q = torch.from_numpy(codes).to(device)
        out = torch.empty(shape, dtype=dtype, device=device)
        for plane in range(planes):
            gshape = (layers, 1, heads * dim) if plane == 0 else (layers, tokens, 1)
            lo = as_dtype(grids[2 * plane], torch.float16, gshape).to(q.device)
            step = as_dtype(grids[2 * plane + 1], torch.float16, gshape).to(q.device)
            out[plane] = dequantize(q[plane], lo, step).view(out[plane].shape)
        return out

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        """Half a grid step of each value's grid, widened by float16 and output rounding."""
        planes, layers, tokens = kv.shape[:3]
        x = kv.float().reshape(planes, layers, tokens, -1)
        levels = _levels((self.kbits, self.vbits), planes, layers, x.device)
        bound = torch.stack([grid_bound(x[p], 1 if p == 0 else 2, levels[p].view(layers, 1, 1)) for p in range(planes)])
        return rounding_bound(kv.float(), bound.view(kv.shape), kv.dtype)


# --- helpers -------------------------------------------------------------------------------------


def _u32(data: np.ndarray) -> np.ndarray:
    """uint32 view of bytes (copied when misaligned, which constriction cannot read)."""
    out = data.view("<u4") if data.ctypes.data % 4 == 0 else data.copy().view("<u4")
    return out


def _levels(bits: tuple[tuple[int, ...], ...], planes: int, layers: int, device: torch.device | str) -> torch.Tensor:
    """float32 [planes, layers] grid levels (2^bits - 1) of each layer's group."""
    table = [[(1 << bits[p][layer * len(bits[p]) // layers]) - 1 for layer in range(layers)] for p in range(planes)]
    return torch.tensor(table, dtype=torch.float32, device=device)


def _anchor_deltas(codes: np.ndarray, anchor: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes of anchor tokens, codes of the others minus their anchor's, offset by `levels`)."""
    rows = np.arange(codes.shape[0])
    others = rows % anchor != 0
    base = codes[(rows // anchor * anchor)[others]].astype(np.int32)
    deltas = codes[others].astype(np.int32) - base + levels
    return codes[::anchor].reshape(-1).astype(np.int32), deltas.reshape(-1)


def _sections(
    payload: bytes | bytearray | memoryview, shape: tuple[int, ...], what: str
) -> tuple[list[torch.Tensor], bytes, np.ndarray, np.ndarray, np.ndarray]:
    """(grid sections, code checksum, records, count tables, stream words) of a payload."""
    planes, layers, tokens, heads, dim = shape
    grid_sizes = [2 * layers * (heads * dim if p == 0 else tokens) for p in range(planes) for _ in (0, 1)]
    head = sum(grid_sizes) + 8 + planes * layers * _RECORD.itemsize
    if len(payload) < head:
        raise CorruptObjectError(f"{what} payload is {len(payload)} bytes, shorter than its {head}-byte head")
    data = np.frombuffer(payload, dtype=np.uint8)
    records = data[head - planes * layers * _RECORD.itemsize : head].view(_RECORD)
    table_words = int(records["len0"].sum(dtype=np.int64) + records["len1"].sum(dtype=np.int64))
    stream_words = int(records["words0"].sum(dtype=np.int64) + records["words1"].sum(dtype=np.int64))
    sizes = [*grid_sizes, 8, records.nbytes, 4 * (table_words + stream_words)]
    sections = split(payload, sizes, what)
    tables = _u32(data[head : head + 4 * table_words])
    words = _u32(data[head + 4 * table_words :])
    return sections[: len(grid_sizes)], bytes(sections[len(grid_sizes)].numpy()), records, tables, words


@dataclass(frozen=True, slots=True)
class _Segment:
    """How to decode the codes [T, C] of one (plane, layer) from its record."""

    plane: int
    levels: int  # the layer's grid has levels + 1 points
    anchor: int
    shape: tuple[int, ...]  # (tokens, channels)

    def decode(self, record: np.void, tables: np.ndarray, words: np.ndarray, cursor: list[int]) -> np.ndarray:
        """The layer's codes; `cursor` (next table word, next stream word) walks tables and words."""
        tokens, channels = self.shape
        mode = int(record["mode"])
        if mode == 0:
            if int(record["len1"]) or int(record["words1"]):
                raise CorruptObjectError("a plain cachegen layer has a second stream")
            return _read_stream(record, 0, tables, words, cursor, tokens * channels, self.levels).reshape(self.shape)
        if mode != 1 or self.plane != 0 or tokens < 2:
            raise CorruptObjectError(f"cachegen layer mode {mode} is invalid for plane {self.plane} of {tokens} tokens")
        num_anchors = -(-tokens // self.anchor)
        anchors = _read_stream(record, 0, tables, words, cursor, num_anchors * channels, self.levels)
        deltas = _read_stream(record, 1, tables, words, cursor, (tokens - num_anchors) * channels, 2 * self.levels)
        anchors = anchors.reshape(num_anchors, channels)
        rows = np.arange(tokens)
        others = rows % self.anchor != 0
        out = np.empty(self.shape, dtype=np.int32)
        out[:: self.anchor] = anchors
        out[others] = deltas.reshape(-1, channels) - self.levels + anchors[(rows // self.anchor)[others]]
        if out.min() < 0 or out.max() > self.levels:
            raise CorruptObjectError("cachegen deltas leave the grid")
        return out


def _read_stream(
    record: np.void, j: int, tables: np.ndarray, words: np.ndarray, cursor: list[int], count: int, top: int
) -> np.ndarray:
    """Decode stream `j` of a record: `count` symbols, none above `top`."""
    first, size, nwords = int(record[f"first{j}"]), int(record[f"len{j}"]), int(record[f"words{j}"])
    if size == 0 or first + size - 1 > top:
        raise CorruptObjectError(f"cachegen table covers symbols {first}..{first + size - 1}, above {top}")
    counts = tables[cursor[0] : cursor[0] + size]
    coded = words[cursor[1] : cursor[1] + nwords]
    cursor[0] += size
    cursor[1] += nwords
    return entropy.decode_stream(entropy.Stream(first, counts, coded), count)


def _cost(symbols: np.ndarray) -> float:
    return entropy.coded_bits(entropy.histogram(symbols)[1])


def _parse_params(params: bytes) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(key bits per group, value bits per group, anchor); CorruptObjectError if malformed."""
    if len(params) != _PARAMS.size:
        raise CorruptObjectError("cachegen parameters are malformed")
    version, nk, nv, delta, anchor, kraw, vraw = _PARAMS.unpack(params)
    kbits, vbits = tuple(kraw[:nk]), tuple(vraw[:nv])
    ok = version == _VERSION and 1 <= nk <= 4 and 1 <= nv <= 4 and delta in _DELTA.values() and 2 <= anchor <= 1024
    unused = kraw[nk:] + vraw[nv:] + params[_PARAMS.size - 2 :]
    if not ok or not all(2 <= b <= 8 for b in kbits + vbits) or any(unused):
        raise CorruptObjectError(f"cachegen parameters are malformed: {params.hex()}")
    return kbits, vbits, anchor
