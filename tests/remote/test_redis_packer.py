"""The redis command packer: a value given as Parts is sent exactly as the joined value would be."""

from __future__ import annotations

import numpy as np

from kvtier.storage.remote.redis import PACKER, Parts


def test_parts_pack_like_the_joined_value():
    header, payload = b"H" * 128, np.arange(10_000, dtype=np.uint8).data
    joined = b"".join(map(bytes, PACKER.pack("SET", "kvtier/ns/key", header + bytes(payload))))
    parts = PACKER.pack("SET", "kvtier/ns/key", Parts([header, payload]))
    assert b"".join(map(bytes, parts)) == joined
    assert any(part is payload for part in parts)  # the payload itself goes to the socket, not a copy


def test_other_commands_pack_as_before():
    assert b"".join(PACKER.pack("GET", "k")) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
