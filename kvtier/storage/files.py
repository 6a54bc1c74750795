"""Objects as files: the path of a key, atomic writes, and removal that tolerates other writers.

Shared by the disk tier (L2) and the shared-filesystem remote tier (fs://), whose directory
layouts must stay identical so that `kvtier inspect` and either tier read both.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from kvtier.keys import DIGEST_BYTES, ChunkKey

SUFFIX = ".kv"


def object_path(root: str, key: ChunkKey) -> str:
    """The file of `key` under `root`: `<root>/<namespace hex>/<digest hex[:2]>/<digest hex>.kv`."""
    digest = key.digest.hex()
    return os.path.join(root, key.namespace.hex(), digest[:2], digest + SUFFIX)


def write_atomic(path: str, buffers: list[memoryview], fsync: bool, tag: str) -> None:
    """Write `buffers` to a temporary file named after `path` and `tag` (unique to the writer),
    then rename it into place: readers see the whole object or none."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{tag}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, buffers)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_if_present(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        unlink_if_present(tmp)
        raise


def parse_name(ns_hex: str, file_name: str) -> ChunkKey | None:
    """The key of a file named by object_path(), or None for any other name."""
    if not file_name.endswith(SUFFIX):
        return None
    try:
        namespace, digest = bytes.fromhex(ns_hex), bytes.fromhex(file_name[: -len(SUFFIX)])
    except ValueError:
        return None
    if len(namespace) != DIGEST_BYTES or len(digest) != DIGEST_BYTES:
        return None
    return ChunkKey(namespace, digest)


def unlink_if_present(path: str | Path) -> bool:
    """Remove `path`; False if it was already gone."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False  # another process sharing the directory removed it first


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    while buffers:
        written = os.writev(fd, buffers)
        while buffers and written >= buffers[0].nbytes:
            written -= buffers[0].nbytes
            buffers.pop(0)
        if buffers and written:
            buffers[0] = buffers[0][written:]
