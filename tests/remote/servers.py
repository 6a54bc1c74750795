"""Real servers for the remote-tier tests, started on free loopback ports and killed afterwards.

A missing server binary skips the tests that need it, except where REQUIRE_TEST_SERVERS=1 (set by
.ci/run): there it fails, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Protocol

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_binary(name: str) -> str:
    """The path of `name`, or skip (fail when servers are required)."""
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        message = f"{name} is not installed (see .ci/run)"
        if os.environ.get("REQUIRE_TEST_SERVERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


class Server(Protocol):
    """A server, or a group of them that the tests treat as one (redis_groups.py)."""

    def start(self) -> Server: ...  # (again after kill)
    def kill(self) -> None: ...  # SIGKILL, as a crash would
    def stop(self) -> None: ...


class ServerProcess:
    """A server subprocess that can be killed (-9) and started again on the same port."""

    def __init__(self, argv: Callable[[int], list[str]], ready: Callable[[int], bool], name: str) -> None:
        self.argv = argv
        self.ready = ready
        self.name = name
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> ServerProcess:
        # the log goes to a file: a pipe nobody reads fills up and stalls a chatty server (moto logs
        # every request)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(self.argv(self.port), stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if _port_open(self.port) and self.ready(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready on port {self.port} within {timeout} s")

    def log_tail(self, size: int = 2000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-size:]

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def redis_server(*extra: str, name: str = "redis-server") -> ServerProcess:
    """redis-server without persistence; `extra` arguments are appended ("--cluster-enabled", "yes")."""
    binary = need_binary("redis-server")

    def ready(port: int) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def argv(port: int) -> list[str]:
        return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra]

    return ServerProcess(argv, ready, name)


S3_ENV = {"AWS_ACCESS_KEY_ID": "kvtier-test", "AWS_SECRET_ACCESS_KEY": "kvtier-test", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "kvtier-test"


def s3_server() -> ServerProcess:
    """moto's S3-compatible server (the real HTTP API, in-memory storage) with the test bucket."""
    binary = need_binary("moto_server")
    for name, value in S3_ENV.items():
        os.environ.setdefault(name, value)

    def ready(port: int) -> bool:
        import boto3

        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        return True

    return ServerProcess(lambda port: [binary, "-H", "127.0.0.1", "-p", str(port)], ready, "moto_server")


def s3_url(server: ServerProcess, prefix: str = "cache") -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint=http://127.0.0.1:{server.port}&region=us-east-1"


def kvtier_server(*extra: str) -> ServerProcess:
    """`kvtier server` as a subprocess (the way users run it)."""

    def ready(port: int) -> bool:
        from kvtier.storage.remote import open_store

        store = open_store(f"kvtier://127.0.0.1:{port}")
        try:
            return bool(store.health(1.0))
        except Exception:  # not up yet: any failure means "try again"
            return False
        finally:
            store.close()

    argv = lambda port: [sys.executable, "-m", "kvtier.cli", "server", "--port", str(port), *extra]  # noqa: E731
    return ServerProcess(argv, ready, "kvtier server")
