"""A `kvtier server` process under an in-flight flood: 16 logged-in clients (from 127.0.0.2 and up)
each send 59 MiB of a 60 MiB upload and stall. Its peak RSS stays within the memory budget + the
in-flight bound + a fixed overhead, and a well-behaved client still stores and loads meanwhile."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from kvtier.units import MiB
from tests.conftest import key
from tests.server.conftest import object_for, proc_status
from tests.server.test_admission import HELLO, TOKEN, put_prefix, source

BUDGET, INFLIGHT, OVERHEAD = 64 * MiB, 128 * MiB, 300 * MiB  # overhead: the target (idle: ~235 MB)
UPLOAD = 60 * MiB


@pytest.fixture
def server_process(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "token").write_text(TOKEN)
    cmd = [sys.executable, "-m", "kvtier", "server", "--port", str(port), "--memory", "64MiB",
           "--max-inflight", "128MiB", "--token-file", str(tmp_path / "token")]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        line = ""
        while "listening on" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited"
        yield proc, ("127.0.0.1", port)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def stall_after_most_of_an_upload(address, i: int, sockets: list[socket.socket]) -> None:
    sock = socket.create_connection(address, timeout=10, source_address=(source(i), 0))
    sockets.append(sock)
    try:
        sock.sendall(HELLO)
        sock.recv(4096)
        sock.sendall(put_prefix(key(i, 5), UPLOAD))
        piece = bytes(MiB)
        for _ in range(59):
            sock.sendall(piece)
    except OSError:
        pass  # refused (BUSY after inflight_wait) or preempted: the server closed it


def test_an_in_flight_flood_stays_within_budget_plus_the_in_flight_bound(server_process, make_client):
    proc, address = server_process
    idle_rss = proc_status(proc.pid, "VmRSS")
    sockets: list[socket.socket] = []
    threads = [threading.Thread(target=stall_after_most_of_an_upload, args=(address, i, sockets)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    client = make_client(address, token=TOKEN)
    k = key(99)
    obj = object_for(k, seed=99, tokens=46_000)  # 5.9 MB
    began = time.monotonic()
    client.put(k, [obj], 10.0)
    assert bytes(client.get([k], 10.0)[0]) == obj
    elapsed = time.monotonic() - began
    peak = proc_status(proc.pid, "VmHWM")
    print(f"idle RSS {idle_rss / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, store+load of 5.9 MB {elapsed * 1e3:.0f} ms")
    for sock in sockets:
        sock.close()
    assert peak > idle_rss + 100 * MiB, "the flood did not hold memory: the test tests nothing"
    assert peak < BUDGET + INFLIGHT + OVERHEAD, f"peak RSS {peak / MiB:.0f} MiB (idle {idle_rss / MiB:.0f} MiB)"
    assert elapsed < 1.0
