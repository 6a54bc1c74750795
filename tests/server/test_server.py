"""The kvtier server over real loopback sockets: round trips, tiers, auth, limits, hostile clients, shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from kvtier.server.protocol import ErrorCode, Op, ServerError, wire_key
from tests.conftest import key
from tests.server.conftest import OBJECT_SIZE, RawClient, error_code, frame, make_object, put_frame

GUARD = make_object(424242, namespace=9)  # stored first; every hostile test checks it afterwards


def store_guard(client) -> None:
    client.put(GUARD[0], [GUARD[1]], 2.0)


def assert_guard_intact(client) -> None:
    """A well-behaved client still reads its data, bit-exact."""
    assert bytes(client.get([GUARD[0]], 2.0)[0]) == GUARD[1]
    assert client.health()["status"] == "ok"


# --- the happy path ------------------------------------------------------------------------------


def test_round_trips_are_bit_exact(client):
    objects = [make_object(i, tokens=t) for i, t in ((1, 4), (2, 1), (3, 16))]
    for k, obj in objects:
        half = len(obj) // 2
        client.put(k, [obj[:half], memoryview(obj)[half:]], 2.0)  # parts are concatenated
    keys = [objects[0][0], key(99), objects[1][0], objects[2][0]]
    got = client.get(keys, 2.0)
    assert got[1] is None
    assert [bytes(g) for g in (got[0], got[2], got[3])] == [obj for _, obj in objects]
    assert client.exists(keys, 2.0) == [True, False, True, True]
    assert client.get([], 2.0) == [] and client.exists([], 2.0) == []


def test_delete(client):
    k, obj = make_object(1)
    client.put(k, [obj], 2.0)
    assert client.delete(k, 2.0) is True
    assert client.delete(k, 2.0) is False
    assert client.get([k], 2.0) == [None] and client.exists([k], 2.0) == [False]


def test_stats_and_health(client):
    k, obj = make_object(1)
    client.put(k, [obj], 2.0)
    client.get([k, key(2)], 2.0)
    stats = client.stats()
    assert stats["server"]["hits"] == 1 and stats["server"]["misses"] == 1 and stats["server"]["puts"] == 1
    assert stats["server"]["connections"] == 1
    assert stats["memory"]["objects"] == 1 and stats["memory"]["bytes"] == len(obj) and "disk" not in stats
    health = client.health()
    assert health["status"] == "ok" and health["uptime_s"] >= 0


def test_memory_budget_evicts_least_recently_used(start_server, make_client):
    client = make_client(start_server(memory=3 * OBJECT_SIZE))
    objects = [make_object(i) for i in range(5)]
    for k, obj in objects:
        client.put(k, [obj], 2.0)
    assert client.exists([k for k, _ in objects], 2.0) == [False, False, True, True, True]
    memory = client.stats()["memory"]
    assert memory["evictions"] == 2 and memory["objects"] == 3 and memory["bytes"] <= 3 * OBJECT_SIZE


def test_object_larger_than_every_tier_is_refused(start_server, make_client):
    client = make_client(start_server(memory=OBJECT_SIZE - 1))
    k, obj = make_object(1)
    with pytest.raises(ServerError) as err:
        client.put(k, [obj], 2.0)
    assert err.value.code is ErrorCode.NO_SPACE
    assert client.exists([k], 2.0) == [False]  # and the connection is still usable


def test_evicted_objects_are_read_from_disk(start_server, make_client, tmp_path):
    client = make_client(start_server(memory=2 * OBJECT_SIZE, disk_path=str(tmp_path / "d"), disk_size=1 << 20))
    objects = [make_object(i) for i in range(6)]
    for k, obj in objects:
        client.put(k, [obj], 2.0)
    assert client.exists([k for k, _ in objects], 2.0) == [True] * 6
    assert [bytes(g) for g in client.get([k for k, _ in objects], 2.0)] == [obj for _, obj in objects]
    stats = client.stats()
    assert stats["memory"]["evictions"] >= 4 and stats["disk"]["hits"] >= 4 and stats["disk"]["objects"] == 6


def test_restart_with_the_same_disk_finds_objects(start_server, make_client, tmp_path):
    disk = {"disk_path": str(tmp_path / "d"), "disk_size": 1 << 20}
    first = start_server(**disk)
    objects = [make_object(i) for i in range(3)]
    for k, obj in objects:
        make_client(first).put(k, [obj], 2.0)
    first.stop()
    client = make_client(start_server(**disk))
    assert [bytes(g) for g in client.get([k for k, _ in objects], 2.0)] == [obj for _, obj in objects]


def test_many_concurrent_clients(start_server, make_client):
    server = start_server(memory=1 << 22)
    shared = make_client(server, max_connections=3)  # threads share one pooled client ...
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        own = make_client(server) if worker % 2 else shared  # ... or have their own
        try:
            for i in range(15):
                k, obj = make_object(i, namespace=worker + 1)
                own.put(k, [obj], 5.0)
                assert bytes(own.get([k], 5.0)[0]) == obj
            keys = [make_object(i, namespace=worker + 1)[0] for i in range(15)]
            assert own.exists(keys, 5.0) == [True] * 15
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert shared.stats()["server"]["errors"] == 0


def test_batches_larger_than_max_keys_are_split_by_the_client(start_server, make_client):
    server = start_server(max_keys=4)
    client = make_client(server)
    objects = [make_object(i) for i in range(10)]
    for k, obj in objects[::2]:
        client.put(k, [obj], 2.0)
    keys = [k for k, _ in objects]
    assert client.exists(keys, 2.0) == [i % 2 == 0 for i in range(10)]
    assert [None if g is None else bytes(g) for g in client.get(keys, 2.0)] == [
        obj if i % 2 == 0 else None for i, (_, obj) in enumerate(objects)
    ]
    raw = RawClient(server.address)
    raw.send(frame(Op.EXISTS, {"keys": [wire_key(k) for k in keys]}))
    assert error_code(raw.reply()) == ErrorCode.BAD_REQUEST


# --- auth ----------------------------------------------------------------------------------------


def test_auth_token_is_required(start_server, make_client):
    server = start_server(token="s3cret")
    store_guard(make_client(server, token="s3cret"))
    for token in ("", "wrong"):
        with pytest.raises(ServerError) as err:
            make_client(server, token=token).get([GUARD[0]], 2.0)
        assert err.value.code is ErrorCode.AUTH_FAILED
    raw = RawClient(server.address)
    raw.send(frame(Op.GET, {"keys": [wire_key(GUARD[0])]}))  # no HELLO
    assert error_code(raw.reply()) == ErrorCode.AUTH_REQUIRED and raw.closed()
    raw = RawClient(server.address)
    raw.send(put_frame(*make_object(1))[:24])  # refused from its header alone, the body is never read
    assert error_code(raw.reply()) == ErrorCode.AUTH_REQUIRED and raw.closed()
    assert_guard_intact(make_client(server, token="s3cret"))


# --- hostile and broken clients ------------------------------------------------------------------

K, OBJ = make_object(1)
BAD_CHECKSUM = OBJ[:-1] + bytes([OBJ[-1] ^ 1])
HEALTH = frame(Op.HEALTH, request_id=2)

# name -> (bytes sent, expected error code or None for "closed without a reply", connection stays usable)
HOSTILE = {
    "bad magic": (b"XXXX" + frame(Op.HEALTH)[4:], ErrorCode.BAD_FRAME, False),
    "bad version": (frame(Op.HEALTH)[:4] + b"\x09" + frame(Op.HEALTH)[5:], ErrorCode.BAD_FRAME, False),
    "truncated header": (frame(Op.HEALTH)[:10], ErrorCode.BAD_FRAME, False),
    "truncated body": (put_frame(K, OBJ)[:200], ErrorCode.BAD_FRAME, False),
    "oversized body": (
        frame(Op.PUT, {"key": wire_key(K)})[:16] + (2**40).to_bytes(8, "little"),
        ErrorCode.FRAME_TOO_LARGE,
        False,
    ),
    "oversized metadata": (
        frame(Op.HEALTH)[:12] + (2**31).to_bytes(4, "little") + bytes(8),
        ErrorCode.FRAME_TOO_LARGE,
        False,
    ),
    "unknown opcode": (frame(0x42) + HEALTH, ErrorCode.UNKNOWN_OP, True),
    "garbage metadata": (
        frame(Op.GET)[:12] + (3).to_bytes(4, "little") + bytes(8) + b"\xc1\x00\xff" + HEALTH,
        ErrorCode.BAD_REQUEST,
        True,
    ),
    "body on a GET": (frame(Op.GET, {"keys": []}, b"xyz") + HEALTH, ErrorCode.BAD_REQUEST, True),
    "key mismatch": (put_frame(key(2), OBJ) + HEALTH, ErrorCode.INVALID_OBJECT, True),
    "bad checksum": (put_frame(K, BAD_CHECKSUM) + HEALTH, ErrorCode.INVALID_OBJECT, True),
    "not an object": (put_frame(K, b"hello") + HEALTH, ErrorCode.INVALID_OBJECT, True),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_frames_get_an_error_and_do_not_hurt_other_clients(server, client, name):
    data, code, stays_open = HOSTILE[name]
    store_guard(client)
    client.put(K, [OBJ], 2.0)  # an invalid PUT must not change what is already stored
    raw = RawClient(server.address)
    raw.send(data)
    raw.end()
    assert error_code(raw.reply()) == code
    if stays_open:
        reply = raw.reply()
        assert reply is not None and reply[0] == Op.HEALTH | 0x80 and reply[1] == 2  # still in step
    assert raw.closed()
    assert_guard_intact(client)
    assert bytes(client.get([K], 2.0)[0]) == OBJ
    assert client.exists([key(2)], 2.0) == [False]


def test_slow_client_is_timed_out_while_others_are_served(start_server, make_client):
    server = start_server(io_timeout=0.3)
    client = make_client(server)
    store_guard(client)
    slow = RawClient(server.address)
    slow.send(put_frame(K, OBJ)[:30])  # a frame started and never finished (slowloris)
    assert_guard_intact(client)
    started = time.monotonic()
    assert error_code(slow.reply()) == ErrorCode.TIMEOUT and slow.closed()
    assert time.monotonic() - started < 2.0
    assert client.stats()["server"]["timeouts"] == 1


def test_idle_connections_are_closed_and_the_client_reconnects(start_server, make_client):
    server = start_server(idle_timeout=0.2)
    client = make_client(server)
    store_guard(client)
    idle = RawClient(server.address)
    assert idle.closed()  # closed by the server without a word
    time.sleep(0.5)  # the client's pooled connection was closed too
    assert_guard_intact(client)


def test_connections_beyond_the_limit_are_refused(start_server, make_client):
    server = start_server(max_connections=2)
    client = make_client(server, max_connections=1)
    store_guard(client)
    other = RawClient(server.address)
    other.send(HEALTH)
    assert other.reply()[0] == Op.HEALTH | 0x80
    refused = RawClient(server.address)  # let in, pending; refused when it logs in (its first frame)
    refused.send(HEALTH)
    assert error_code(refused.reply()) == ErrorCode.BUSY and refused.closed()
    other.close()
    time.sleep(0.1)
    assert_guard_intact(client)


# --- shutdown ------------------------------------------------------------------------------------


def test_graceful_shutdown_finishes_requests_in_flight(server, client):
    store_guard(client)
    data = put_frame(K, OBJ, request_id=5)
    busy = RawClient(server.address)
    busy.send(data[:100])  # a PUT in flight
    idle = RawClient(server.address)
    idle.send(HEALTH)
    assert idle.reply() is not None
    time.sleep(0.1)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    assert idle.closed()  # idle connections are closed at once
    time.sleep(0.2)
    assert stopper.is_alive()  # waiting for the PUT
    busy.send(data[100:])
    reply = busy.reply()
    assert reply is not None and reply[:2] == (Op.PUT | 0x80, 5) and busy.closed()
    stopper.join(5)
    assert not stopper.is_alive()
    assert server.server.cache.memory.stats.puts == 2  # the guard and the PUT that was in flight
    with pytest.raises(OSError):
        socket.create_connection(server.address, timeout=1).close()


def test_cli_server_serves_and_stops_on_sigterm(tmp_path, make_client):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token_file = tmp_path / "token"
    token_file.write_text("tok\n")
    cmd = [sys.executable, "-m", "kvtier.cli", "server", "--port", str(port), "--memory", "1MiB",
           "--token-file", str(token_file)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        lines = [proc.stderr.readline() for _ in range(1)]
        while "listening on" not in lines[-1] and lines[-1] and len(lines) < 50:
            lines.append(proc.stderr.readline())
        assert f"listening on 127.0.0.1:{port}" in lines[-1] and "token required" in lines[-1], lines
        client = make_client(("127.0.0.1", port), token="tok")
        store_guard(client)
        assert_guard_intact(client)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
