"""The kvtier server's disk: already-framed objects as files (the machinery is FileTier's)."""

from __future__ import annotations

import os

import torch

from kvtier.codec.framing import HEADER_SIZE, check_digest, parse_header
from kvtier.errors import CorruptObjectError
from kvtier.keys import ChunkKey
from kvtier.storage.filetier import FileTier, read_hashed
from kvtier.storage.staging import StagingBuffer


class ObjectDiskTier(FileTier):
    """Opaque framed objects (uint8 tensors of header + payload) in files under `root`.

    `put` writes an object's bytes as they are: the caller has validated them (the kvtier server
    does). `get` validates the framing itself (header, key, length, payload checksum) and returns
    the whole object, so any layout and codec can be stored without the tier knowing them.
    """

    def _encode(self, key: ChunkKey, kv: torch.Tensor) -> list[memoryview]:
        return [kv.numpy().data.cast("B")]

    def _read(self, path: str, key: ChunkKey, staging: StagingBuffer | None) -> tuple[torch.Tensor, int]:
        with open(path, "rb", buffering=0) as f:
            head = f.read(HEADER_SIZE)
            header = parse_header(head)
            if header.key != key:
                raise CorruptObjectError(f"object holds {header.key}, expected {key}")
            size = os.fstat(f.fileno()).st_size
            if size != HEADER_SIZE + header.payload_len:
                raise CorruptObjectError(f"file is {size} bytes, header says {HEADER_SIZE + header.payload_len}")
            obj = torch.empty(size, dtype=torch.uint8)
            view = obj.numpy().data
            view[:HEADER_SIZE] = head
            digest = read_hashed(f, view[HEADER_SIZE:])
        check_digest(header, digest)
        return obj, size
