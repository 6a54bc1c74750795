"""Property test: random bytes and mutated valid frames never hurt the server or another client's data.

Every hostile connection must end with well-formed replies (results or error replies) and a closed
connection, never a hang; afterwards a well-behaved client reads its object bit-exact.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.keys import ChunkKey
from kvtier.server.client import KVTierClient
from kvtier.server.protocol import REPLY_BIT, ErrorCode, Op, wire_key
from kvtier.server.server import ServerThread
from tests.server.conftest import FAST, RawClient, frame, make_object, object_for, put_frame

# A guard key far (in bytes) from every key below, so no mutation can turn a frame into one aimed at it.
GUARD_KEY = ChunkKey(hashlib.sha256(b"guard ns").digest()[:16], hashlib.sha256(b"guard digest").digest()[:16])
GUARD_OBJ = object_for(GUARD_KEY, seed=77)
K, OBJ = make_object(1)
VALID = [
    frame(Op.HELLO, {"token": "", "client": "fuzz"}),
    frame(Op.HEALTH),
    frame(Op.STATS),
    frame(Op.EXISTS, {"keys": [wire_key(K), wire_key(make_object(3)[0])]}),
    frame(Op.GET, {"keys": [wire_key(K)]}),
    frame(Op.DELETE, {"key": wire_key(make_object(4)[0])}),
    put_frame(*make_object(5)),
    put_frame(K, OBJ),
]


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, or valid frames back to back with a few random edits."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(VALID), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if edit == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif edit == "truncate":
            del data[at:]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


@pytest.fixture(scope="module")
def fuzzed():
    server = ServerThread(replace(FAST, max_frame=1 << 16, max_meta=1 << 12, io_timeout=1.0)).start()
    client = KVTierClient(*server.address)
    client.put(GUARD_KEY, [GUARD_OBJ], 2.0)
    yield server, client
    server.server.cache.check()
    client.close()
    server.stop()


@settings(max_examples=200, deadline=None)
@given(data=hostile_bytes())
def test_hostile_bytes_get_errors_or_a_closed_connection(fuzzed, data):
    server, client = fuzzed
    raw = RawClient(server.address, timeout=5.0)
    try:
        raw.sock.sendall(data)
        raw.end()
        while (reply := raw.reply()) is not None:  # every reply is a well-formed frame
            op, _, meta, _ = reply
            assert op == Op.ERROR or (op & REPLY_BIT and Op(op & ~REPLY_BIT))
            if op == Op.ERROR:
                assert ErrorCode(meta["code"]) and meta["message"]
    except TimeoutError:
        raise  # the server hung on this input
    except (OSError, ValueError):
        pass  # reset, not connected, or a reply cut short by the close: all end the connection
    finally:
        raw.close()
    assert bytes(client.get([GUARD_KEY], 2.0)[0]) == GUARD_OBJ
