"""Admission control against hostile sockets from other loopback addresses (127.0.0.2 and up), while
a well-behaved client on 127.0.0.1 keeps storing and loading: idle floods, the login deadline,
per-address shares, the fair main pool, bytes in flight and the rate floor."""

from __future__ import annotations

import resource
import socket
import time

import msgspec
import pytest

from kvtier.server.protocol import ErrorCode, Op, pack_header, wire_key
from tests.conftest import key
from tests.server.conftest import RawClient, error_code, frame, make_object, object_for

TOKEN = "tok"
HELLO = frame(Op.HELLO, {"token": TOKEN, "client": "hostile"})
GUARD = make_object(31337, namespace=7)


@pytest.fixture(scope="module", autouse=True)
def more_files():
    """Room for a few thousand sockets (each one is two descriptors here: client and server side)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(want, 65536)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def source(i: int) -> str:
    """The i-th hostile loopback address: 127.0.0.2, 127.0.0.3, ..."""
    return f"127.0.{(i + 2) // 254}.{(i + 2) % 254 or 254}"


def still_open(raw: RawClient, wait: float = 0.05) -> bool:
    """Whether the server left this connection open (nothing to read, no close) for `wait` seconds."""
    raw.sock.settimeout(wait)
    try:
        return raw.sock.recv(1, socket.MSG_PEEK) != b""
    except TimeoutError:
        return True
    except OSError:
        return False


def logged_in(server, i: int = 0) -> RawClient:
    raw = RawClient(server.address, source=source(i))
    raw.send(HELLO)
    assert raw.reply()[0] == Op.HELLO | 0x80
    return raw


def served_quickly(client, seconds: float = 1.0) -> None:
    """The well-behaved client stores and loads its object within `seconds`."""
    began = time.monotonic()
    client.put(GUARD[0], [GUARD[1]], 5.0)
    assert bytes(client.get([GUARD[0]], 5.0)[0]) == GUARD[1]
    assert time.monotonic() - began < seconds


# --- connections ---------------------------------------------------------------------------------


def test_an_idle_flood_does_not_lock_anyone_out(start_server, make_client):
    server = start_server(token=TOKEN, max_pending=64, max_pending_per_address=32, login_timeout=60.0)
    flood = [RawClient(server.address, source=source(i % 40)) for i in range(1100)]
    client = make_client(server, token=TOKEN)
    served_quickly(client)
    stats = server.server.stats
    assert len(server.server._conns.pending) <= 64
    assert stats.pending_dropped >= 1100 - 64
    assert sum(not still_open(raw, 0.001) for raw in flood) >= 1100 - 64


def test_a_connection_that_never_logs_in_is_closed_after_the_login_timeout(start_server):
    server = start_server(token=TOKEN, login_timeout=0.3)
    began = time.monotonic()
    idle = RawClient(server.address, source=source(0))
    assert idle.closed() and 0.25 < time.monotonic() - began < 1.5
    assert server.server.stats.login_timeouts == 1


def test_without_a_token_the_first_frame_logs_in(start_server):
    server = start_server(login_timeout=0.3)
    speaks = RawClient(server.address, source=source(0))
    speaks.send(frame(Op.HEALTH))
    assert speaks.reply()[0] == Op.HEALTH | 0x80
    silent = RawClient(server.address, source=source(1))
    time.sleep(0.8)
    assert still_open(speaks) and not still_open(silent)


def test_one_address_cannot_take_the_pending_pool(start_server):
    server = start_server(token=TOKEN, max_pending_per_address=4, login_timeout=60.0)
    same = [RawClient(server.address, source=source(0)) for _ in range(6)]
    other = RawClient(server.address, source=source(1))
    time.sleep(0.1)
    assert [still_open(raw) for raw in same] == [False, False, True, True, True, True]  # its oldest went
    assert still_open(other)


def test_a_full_main_pool_makes_room_for_a_less_crowded_address(start_server, make_client):
    server = start_server(token=TOKEN, max_connections=4)
    crowd = [logged_in(server, 0) for _ in range(4)]
    client = make_client(server, token=TOKEN, max_connections=1)
    served_quickly(client)  # one of the crowd's idle connections was closed for it
    assert server.server.stats.connections_evicted == 1
    assert sum(still_open(raw) for raw in crowd) == 3
    late = RawClient(server.address, source=source(0))  # the crowded address gets no more
    late.send(HELLO)
    assert error_code(late.reply()) == ErrorCode.BUSY and late.closed()


# --- bytes in flight and the rate floor ----------------------------------------------------------


def put_prefix(k, size: int) -> bytes:
    """A PUT frame's header and metadata declaring a body of `size` bytes (the body still to come)."""
    meta = msgspec.msgpack.encode({"key": wire_key(k)})
    return pack_header(Op.PUT, 1, len(meta), size) + meta


def test_an_upload_that_stalls_is_preempted_for_an_address_holding_less(start_server, make_client):
    server = start_server(token=TOKEN, memory=8 << 20, max_frame=4 << 20, max_inflight_bytes=4 << 20, min_rate=1 << 30)
    hog = logged_in(server, 0)
    hog.send(put_prefix(key(1), 3 << 20))
    hog.send(bytes(1 << 20))  # a third of it, then nothing
    time.sleep(0.1)
    client = make_client(server, token=TOKEN)
    k = key(2)
    big = object_for(k, seed=2, tokens=4096)  # 1 MiB
    began = time.monotonic()
    client.put(k, [big], 5.0)
    assert time.monotonic() - began < 0.5
    assert bytes(client.get([k], 5.0)[0]) == big
    assert error_code(hog.reply()) == ErrorCode.BUSY and hog.closed()
    assert server.server.stats.uploads_preempted == 1


def test_an_upload_without_room_waits_then_gets_busy(start_server):
    server = start_server(token=TOKEN, max_frame=4 << 20, max_inflight_bytes=4 << 20, inflight_wait=0.3)
    hog = logged_in(server, 0)
    hog.send(put_prefix(key(1), 3 << 20))
    time.sleep(0.05)
    same = logged_in(server, 0)  # the same address: nothing to preempt
    began = time.monotonic()
    same.send(put_prefix(key(2), 2 << 20))
    assert error_code(same.reply()) == ErrorCode.BUSY and 0.25 < time.monotonic() - began < 1.5
    assert server.server.stats.uploads_refused == 1 and still_open(hog)
    hog.close()  # else shutdown waits its grace period for the upload in flight


def test_a_frame_slower_than_the_rate_floor_is_cut(start_server, make_client):
    server = start_server(token=TOKEN, min_rate=1 << 20, io_timeout=30.0)
    slow = logged_in(server, 0)
    slow.send(put_prefix(key(1), 256 << 10))  # allowed 1 s + 0.25 s
    began = time.monotonic()
    code = None
    while time.monotonic() - began < 5:
        try:
            slow.send(bytes(1024))
        except OSError:
            break
        slow.sock.settimeout(0.05)
        try:
            code = error_code(slow.reply())
            break
        except TimeoutError:
            continue
    assert code == ErrorCode.TIMEOUT and 1.2 < time.monotonic() - began < 2.0
    served_quickly(make_client(server, token=TOKEN))


def test_a_full_pending_pool_drops_the_oldest_of_the_address_holding_most(start_server):
    server = start_server(token=TOKEN, max_pending=8, max_pending_per_address=8, login_timeout=60.0)
    crowd = [RawClient(server.address, source=source(0)) for _ in range(8)]
    time.sleep(0.05)
    newcomer = RawClient(server.address, source=source(1))  # the pool is full: the crowd pays
    time.sleep(0.05)
    second = RawClient(server.address, source=source(1))
    time.sleep(0.1)
    assert [still_open(raw) for raw in crowd] == [False, False] + [True] * 6
    assert still_open(newcomer) and still_open(second)


def test_a_first_frame_cannot_carry_large_metadata(start_server):
    server = start_server(token=TOKEN)
    raw = RawClient(server.address, source=source(0))
    raw.send(pack_header(Op.HELLO, 1, 4097, 0))  # 4 KiB + 1 of metadata announced before login
    assert error_code(raw.reply()) == ErrorCode.FRAME_TOO_LARGE and raw.closed()


def test_large_metadata_is_reserved_in_flight_like_a_body(start_server):
    server = start_server(token=TOKEN, max_frame=2 << 20, max_meta=1 << 20, max_inflight_bytes=3 << 20,
                          inflight_wait=0.3)  # fmt: skip
    first = logged_in(server, 0)
    first.send(pack_header(Op.EXISTS, 1, 1 << 20, (1 << 20) - 64) + bytes(1 << 19))  # 2 MiB announced, 0.5 MiB sent
    time.sleep(0.05)
    second = logged_in(server, 0)
    second.send(pack_header(Op.EXISTS, 1, 1 << 20, (1 << 20) - 64))  # 2 MiB more do not fit in 3 MiB
    assert error_code(second.reply()) == ErrorCode.BUSY
    assert server.server.stats.uploads_refused == 1
    first.close()
