"""L2: canonical chunk tensors as framed files in a local directory (the machinery is FileTier's)."""

from __future__ import annotations

import os

import torch

from kvtier.codec import Codec
from kvtier.codec.framing import HEADER_SIZE, check_digest, check_header, decode_object, encode_object, parse_header
from kvtier.errors import CorruptObjectError
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.storage.filetier import FileTier, read_hashed
from kvtier.storage.mapped import map_if_cached
from kvtier.storage.staging import StagingBuffer


class DiskTier(FileTier):
    """Canonical chunk tensors, framed with `layout` and `codec`, in files under `root`.

    `get` returns memory of its own. `get_into` (the retrieve path, whose caller copies the chunk
    out at once) reads a file whose pages are all in the page cache in place (mapped.py): the
    tensor is then a private view of the file's pages, holding its descriptor until dropped.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity: int,
        layout: KVLayout,
        codec: Codec,
        policy: str = "lru",
        fsync: bool = False,
        name: str = "l2",
    ) -> None:
        self.layout = layout
        self.codec = codec
        super().__init__(root, capacity, policy, fsync, name)

    def _encode(self, key: ChunkKey, kv: torch.Tensor) -> list[memoryview]:
        header, payload = encode_object(key, self.layout, self.codec, kv)
        return [memoryview(header), payload.cast("B")]

    def _read(self, path: str, key: ChunkKey, staging: StagingBuffer | None) -> tuple[torch.Tensor, int]:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            device = self._decode_device(staging)
            # the staged path copies the tensor out at once: read a cached file in place
            mapped = None if staging is None else map_if_cached(f.fileno(), size)
            if mapped is not None:
                return decode_object(mapped, key, self.layout, self.codec, device), size
            header = parse_header(f.read(HEADER_SIZE))
            check_header(header, key, self.layout, self.codec)
            if size != HEADER_SIZE + header.payload_len:
                raise CorruptObjectError(f"file is {size} bytes, header says {HEADER_SIZE + header.payload_len}")
            if staging is None:
                payload = torch.empty(header.payload_len, dtype=torch.uint8)
            else:
                payload = staging.take(header.payload_len)
            view = payload.numpy().data
            digest = read_hashed(f, view)
        check_digest(header, digest)
        return self.codec.decode(view, header.shape, header.dtype, header.params, device), size

    def _decode_device(self, staging: StagingBuffer | None) -> torch.device | None:
        """Where to decode: the caller's device for a compressing codec read on the request path;
        the CPU otherwise (raw "decoding" on a GPU would be a copy from pageable memory, which the
        caller's scatter does as well; promotions into L1 stay on the CPU)."""
        if staging is None or staging.device is None or staging.device.type == "cpu" or self.codec.name == "raw":
            return None
        return staging.device
