"""The wire format (pinned bytes, strict decoding), object validation and the server's config checks."""

from __future__ import annotations

import msgspec
import pytest
import torch

from kvtier.errors import CorruptObjectError
from kvtier.server.config import ServerConfig
from kvtier.server.protocol import (
    HEADER_SIZE,
    ErrorCode,
    Hello,
    KeyMeta,
    KeysMeta,
    Op,
    ProtocolError,
    chunk_key,
    decode_meta,
    encode_meta,
    pack_header,
    unpack_header,
    wire_key,
)
from kvtier.server.store import ObjectCache, validate_object
from kvtier.storage.objects import ObjectDiskTier
from tests.conftest import key
from tests.server.conftest import OBJECT_SIZE, make_object


def test_header_bytes_are_pinned():
    data = pack_header(Op.GET, 7, 3, 5)
    assert HEADER_SIZE == len(data) == 24
    assert data.hex(" ") == "4b 56 54 53 01 03 00 00 07 00 00 00 03 00 00 00 05 00 00 00 00 00 00 00"
    header = unpack_header(data)
    assert (header.op, header.request_id, header.meta_len, header.body_len) == (Op.GET, 7, 3, 5)


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [(0, ord("X"), "bad magic"), (4, 2, "unsupported protocol version"), (6, 1, "flags must be 0")],
)
def test_unpack_rejects_a_broken_header(offset, value, match):
    data = bytearray(pack_header(Op.HEALTH, 1, 0, 0))
    data[offset] = value
    with pytest.raises(ProtocolError, match=match) as err:
        unpack_header(data)
    assert err.value.code is ErrorCode.BAD_FRAME and err.value.closes


def test_metadata_is_a_msgpack_map_of_named_fields():
    k = key(3)
    assert encode_meta(KeyMeta(wire_key(k))) == msgspec.msgpack.encode({"key": k.namespace + k.digest})
    assert decode_meta(KeysMeta, msgspec.msgpack.encode({"keys": [wire_key(k)], "future": 1})).keys == [wire_key(k)]
    assert chunk_key(wire_key(k)) == k
    assert decode_meta(Hello, b"") == Hello()  # empty metadata = no fields


@pytest.mark.parametrize(
    "meta",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x81\xa3key",  # map cut short
        msgspec.msgpack.encode({"key": b"short"}),
        msgspec.msgpack.encode({"key": "a string, not bytes"}),
        msgspec.msgpack.encode([b"x" * 32]),
        b"",  # the key is required
    ],
)
def test_bad_metadata_is_a_bad_request(meta):
    with pytest.raises(ProtocolError) as err:
        decode_meta(KeyMeta, meta)
    assert err.value.code is ErrorCode.BAD_REQUEST and not err.value.closes


def test_validate_object_accepts_only_an_intact_object_for_its_key():
    k, obj = make_object(1)
    validate_object(k, memoryview(obj))
    with pytest.raises(CorruptObjectError, match="sent as"):
        validate_object(key(2), memoryview(obj))
    flipped = bytearray(obj)
    flipped[-1] ^= 1
    with pytest.raises(CorruptObjectError, match="checksum"):
        validate_object(k, memoryview(flipped))
    with pytest.raises(CorruptObjectError, match="bytes"):
        validate_object(k, memoryview(obj)[:-1])
    with pytest.raises(CorruptObjectError):
        validate_object(k, memoryview(obj)[:100])


def test_object_cache_writes_through_to_disk_and_promotes_disk_hits(tmp_path):
    cache = ObjectCache(2 * OBJECT_SIZE, tmp_path, 100 * OBJECT_SIZE)
    objects = [make_object(i) for i in range(4)]
    for k, obj in objects:
        assert cache.put(k, memoryview(bytearray(obj))) == (True, True)
    assert cache.memory.stats.evictions == 2 and cache.get_memory(objects[0][0]) is None
    found = cache.get_disk([objects[0][0], key(99)])
    assert found[1] is None and found[0] is not None and bytes(found[0].numpy()) == objects[0][1]
    assert cache.get_memory(objects[0][0]) is not None  # promoted
    assert cache.delete(objects[0][0]) and not cache.on_disk([objects[0][0]])[0]
    cache.check()


def test_object_disk_tier_rejects_a_file_moved_to_another_key(tmp_path):
    tier = ObjectDiskTier(tmp_path, 100 * OBJECT_SIZE)
    k, obj = make_object(1)
    assert tier.put(k, torch.frombuffer(bytearray(obj), dtype=torch.uint8))
    assert bytes(tier.get(k).numpy()) == obj
    target = tier.path(key(2))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(obj)
    assert tier.get(key(2)) is None and tier.stats.corrupt == 1 and not target.exists()
    tier.path(k).write_bytes(obj[:-3])
    assert tier.get(k) is None and tier.stats.corrupt == 2
    tier.check()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"port": 70000}, "port"),
        ({"memory": 0}, "could store nothing"),
        ({"policy": "random"}, "eviction policy"),
        ({"max_frame": 10}, "max_frame"),
        ({"max_keys": 0}, "max_keys"),
        ({"io_timeout": 0}, "io_timeout"),
    ],
)
def test_server_config_is_validated(overrides, match):
    with pytest.raises(ValueError, match=match):
        ServerConfig(**overrides)
