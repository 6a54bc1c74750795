"""Large reply bodies are received with blocking MSG_WAITALL calls that still keep the deadline."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from kvtier.server.connection import Connection


def _pair():
    a, b = socket.socketpair()
    return Connection(a), b


def test_a_body_sent_in_pieces_arrives_whole():
    conn, peer = _pair()
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()

    def send():
        for i in range(0, len(data), 100_000):
            peer.sendall(data[i : i + 100_000])
            time.sleep(0.001)

    sender = threading.Thread(target=send)
    sender.start()
    body = conn.read_body(len(data), time.monotonic() + 10)
    sender.join()
    assert bytes(body) == data
    conn.close()
    peer.close()


def test_a_stalled_body_costs_the_deadline_then_times_out():
    conn, peer = _pair()
    peer.sendall(bytes(200_000))  # a part of the body, then nothing
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        conn.read_body(1 << 20, began + 0.6)
    assert 0.6 <= time.monotonic() - began < 0.6 + 0.4  # the deadline, plus at most part of one slice
    conn.close()
    peer.close()


def test_a_closed_connection_mid_body_is_an_error_not_a_hang():
    conn, peer = _pair()
    peer.sendall(bytes(100_000))
    peer.close()
    with pytest.raises(ConnectionError, match="after 100000 of"):
        conn.read_body(1 << 20, time.monotonic() + 5)
    conn.close()
