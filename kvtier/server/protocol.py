"""The kvtier server's wire protocol, shared by the server and its client (docs/protocol.md).

A frame is a fixed 24-byte header, then `meta_len` bytes of msgpack metadata (a map; empty means
"no fields"), then `body_len` raw bytes. Header, little-endian:

    magic b"KVTS" | version u8 | opcode u8 | flags u16 (0) | request id u32 | meta_len u32 | body_len u64

Bulk bytes (stored objects) travel in the body, never inside msgpack, so both sides move them
with plain socket calls into and out of their own buffers. A reply carries the request's id and
opcode | 0x80, or the opcode ERROR with an `ErrorReply`. Nothing is ever pickled.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any, TypeVar

import msgspec

from kvtier.errors import TierError
from kvtier.keys import DIGEST_BYTES, ChunkKey

MAGIC = b"KVTS"
VERSION = 1
HEADER = struct.Struct("<4sBBHIIQ")
HEADER_SIZE = HEADER.size  # 24
REPLY_BIT = 0x80
KEY_BYTES = 2 * DIGEST_BYTES  # a key on the wire: namespace then digest
DEFAULT_PORT = 7480


class Op(IntEnum):
    """Request opcodes; the reply to op X has opcode X | 0x80, an error reply has ERROR."""

    HELLO = 1  # {token, client} -> HelloReply; must come first when the server has a token
    PUT = 2  # {key}, body = the object -> PutReply
    GET = 3  # {keys} -> GetReply, body = the present objects back to back
    EXISTS = 4  # {keys} -> ExistsReply
    DELETE = 5  # {key} -> DeleteReply
    STATS = 6  # {} -> a map of counter maps
    HEALTH = 7  # {} -> HealthReply
    ERROR = 0xFF  # reply only: ErrorReply


class ErrorCode(IntEnum):
    """Error reply codes. Codes in CLOSING end the connection after the reply."""

    BAD_FRAME = 1  # bad magic, version or flags: the byte stream cannot be trusted any more
    FRAME_TOO_LARGE = 2  # declared metadata or body larger than the server's limits
    BAD_REQUEST = 3  # metadata not valid for the opcode (garbage msgpack, wrong types, too many keys)
    UNKNOWN_OP = 4  # opcode not in Op
    AUTH_REQUIRED = 5  # a request before a successful HELLO on a server with a token
    AUTH_FAILED = 6  # HELLO with a wrong token
    INVALID_OBJECT = 7  # PUT body is not a valid kvtier object for its key; nothing stored
    NO_SPACE = 8  # the object fits in no tier
    BUSY = 9  # too many connections
    SHUTTING_DOWN = 10  # the server is stopping
    TIMEOUT = 11  # a frame did not arrive within the server's I/O timeout
    INTERNAL = 12  # a server bug; logged with a traceback


CLOSING = frozenset(
    {
        ErrorCode.BAD_FRAME,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.AUTH_REQUIRED,
        ErrorCode.AUTH_FAILED,
        ErrorCode.BUSY,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.TIMEOUT,
    }
)


class ProtocolError(TierError):
    """A frame broke the protocol; `code` is the ErrorCode the other side gets (or sent)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def closes(self) -> bool:
        """Whether the connection must be closed after this error."""
        return self.code in CLOSING


class ServerError(ProtocolError):
    """The server answered a request with an error reply."""


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A decoded frame header."""

    op: int
    request_id: int
    meta_len: int
    body_len: int


def pack_header(op: int, request_id: int, meta_len: int, body_len: int) -> bytes:
    """The 24 header bytes of a frame."""
    return HEADER.pack(MAGIC, VERSION, op, 0, request_id, meta_len, body_len)


def unpack_header(data: bytes | bytearray | memoryview) -> FrameHeader:
    """Decode a 24-byte header; ProtocolError(BAD_FRAME) for a wrong magic, version or flags."""
    magic, version, op, flags, request_id, meta_len, body_len = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unsupported protocol version {version}, expected {VERSION}")
    if flags:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"flags must be 0, got {flags:#x}")
    return FrameHeader(op, request_id, meta_len, body_len)


# --- metadata ------------------------------------------------------------------------------------

WireKey = Annotated[bytes, msgspec.Meta(min_length=KEY_BYTES, max_length=KEY_BYTES)]


class Hello(msgspec.Struct):
    """HELLO metadata: the auth token (empty when the server has none) and a free-form client name."""

    token: str = ""
    client: str = ""


class HelloReply(msgspec.Struct):
    """The server's identity and limits, so a client can check requests before sending them."""

    server: str
    version: int
    auth: bool
    max_frame: int
    max_meta: int
    max_keys: int


class KeyMeta(msgspec.Struct):
    """PUT and DELETE metadata."""

    key: WireKey


class KeysMeta(msgspec.Struct):
    """GET and EXISTS metadata."""

    keys: list[WireKey]


class PutReply(msgspec.Struct):
    """Where the object went."""

    memory: bool
    disk: bool


class GetReply(msgspec.Struct):
    """Per requested key, its object's size in the body, or -1 when absent."""

    sizes: list[int]


class ExistsReply(msgspec.Struct):
    present: list[bool]


class DeleteReply(msgspec.Struct):
    deleted: bool


class HealthReply(msgspec.Struct):
    status: str
    version: str
    uptime_s: float


class ErrorReply(msgspec.Struct):
    code: int
    message: str


Stats = dict[str, dict[str, Any]]
M = TypeVar("M")
_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
_EMPTY_MAP = b"\x80"


def encode_meta(meta: msgspec.Struct | Stats | None) -> bytes:
    """The msgpack bytes of `meta` (empty for None)."""
    return b"" if meta is None else _ENCODER.encode(meta)


def decode_meta(kind: type[M], data: bytes | bytearray | memoryview) -> M:
    """Decode metadata as `kind`; ProtocolError(BAD_REQUEST) when it is not valid msgpack of that shape."""
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.msgpack.Decoder(kind)
    try:
        value: M = decoder.decode(data if len(data) else _EMPTY_MAP)
        return value
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"metadata: {exc}") from None


def wire_key(key: ChunkKey) -> bytes:
    """A key's 32 bytes on the wire."""
    return key.namespace + key.digest


def chunk_key(data: bytes) -> ChunkKey:
    """The ChunkKey of 32 wire bytes."""
    return ChunkKey(data[:DIGEST_BYTES], data[DIGEST_BYTES:])
