"""Redis Cluster and Redis Sentinel deployments for the remote-tier tests, built from ServerProcess.

Each group looks like one server to the tests: `start()` (again after a crash), `kill()` (SIGKILL of
the node a crash hurts most), `stop()`, and a `url` for the tier. Every process binds 127.0.0.1 on
free ports and writes its files (cluster node tables, the sentinel's config) to one temp directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tests.remote.servers import ServerProcess, free_port, need_binary, redis_server

SERVICE = "kvtier"  # the name the sentinel monitors the master under
# cluster nodes and sentinels fsync their config files on every topology change, blocking while they
# do: on a busy shared disk that took seconds, so their files go to memory where there is a tmpfs
_FILES = "/dev/shm" if os.path.isdir("/dev/shm") else None
T = TypeVar("T")


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll `condition` until it holds; RuntimeError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:  # a node that is still starting: any failure means "poll again"
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} within {timeout} s")


def ask(port: int, fn: Callable[[Any], T]) -> T:
    """`fn(client)` with a short-lived client of the server on `port`."""
    import redis

    client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
    try:
        return fn(client)
    finally:
        client.close()


class RedisClusterGroup:
    """Three masters and no replicas; kill() crashes the first node, whose slots then fail alone."""

    def __init__(self, masters: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="kvtier-cluster-", dir=_FILES)
        self.nodes = [self._node(i) for i in range(masters)]
        self._created = False

    def _node(self, i: int) -> ServerProcess:
        # the other masters keep serving their slots while one is down (require-full-coverage no)
        node = redis_server(
            "--cluster-enabled", "yes", "--cluster-config-file", f"{self.dir}/nodes-{i}.conf",
            "--cluster-node-timeout", "5000", "--cluster-require-full-coverage", "no", "--dir", self.dir,
            name=f"cluster node {i}",
        )  # fmt: skip
        node.port = _port_with_free_bus()
        return node

    @property
    def url(self) -> str:
        """Two seed nodes, the first of them the one kill() crashes."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port},127.0.0.1:{self.nodes[1].port}"

    def start(self) -> RedisClusterGroup:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                node.start()
        if not self._created:
            self._create()
        for node in self.nodes:  # a restarted master refuses commands for 2 s (CLUSTER_WRITABLE_DELAY)
            wait_for(f"{node.name} reports cluster_state:ok", lambda n=node: _cluster_ok(n.port))

    def _create(self) -> None:
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        cli = need_binary("redis-cli")
        argv = [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        self._created = True

    def victim(self) -> ServerProcess:
        """The node kill() crashes: the first seed."""
        return self.nodes[0]

    def kill(self) -> None:
        self.victim().kill()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _port_with_free_bus() -> int:
    """A free port whose cluster bus port (port + 10000) is free too (redis 6 cannot choose another)."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def _cluster_ok(port: int) -> bool:
    return bool(ask(port, lambda c: c.execute_command("CLUSTER INFO")["cluster_state"] == "ok"))


def _replica_online(port: int) -> bool:
    return bool(ask(port, lambda c: c.info("replication").get("slave0", {}).get("state") == "online"))


class RedisSentinelGroup:
    """A master, one replica and one sentinel (quorum 1) that fails over 1 s after the master dies."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="kvtier-sentinel-", dir=_FILES)
        # a full sync starts at once (it waits 5 s for more replicas by default), also after a failover
        sync = ("--dir", self.dir, "--repl-diskless-sync-delay", "0")
        self.master = redis_server(*sync, name="sentinel's master")
        self.replica = redis_server(*sync, "--replicaof", "127.0.0.1", str(self.master.port), name="sentinel's replica")
        self.sentinel = self._sentinel()
        self._killed: list[ServerProcess] = []

    def _sentinel(self) -> ServerProcess:
        binary = need_binary("redis-server")  # `redis-server --sentinel` is redis-sentinel
        conf = f"{self.dir}/sentinel.conf"  # the sentinel rewrites it as it learns the topology
        with open(conf, "w") as f:
            f.write(
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 1\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
        argv = lambda port: [binary, conf, "--sentinel", "--port", str(port), "--bind", "127.0.0.1"]  # noqa: E731
        return ServerProcess(argv, lambda port: bool(ask(port, lambda c: c.ping())), "redis sentinel")

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{SERVICE}"

    def start(self) -> RedisSentinelGroup:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.master.proc is None:
            self.master.start()
            self.replica.start()
            # the sentinel finds replicas in the master's INFO, which it reads at start and then
            # every 10 s: start it once the replica is attached, so that it can fail over at once
            wait_for("the replica is in sync", lambda: _replica_online(self.master.port))
            self.sentinel.start()
        for server in self._killed:
            server.start()
        self._killed.clear()

    def master_port(self) -> int:
        """The port of the master the sentinel reports now."""
        return int(ask(self.sentinel.port, lambda c: c.sentinel_get_master_addr_by_name(SERVICE))[1])

    def victim(self) -> ServerProcess:
        """The server kill() crashes: the current master."""
        return self.master if self.master.port == self.master_port() else self.replica

    def kill(self) -> None:
        """SIGKILL the current master (the sentinel promotes the replica about 1 s later)."""
        victim = self.victim()
        victim.kill()
        self._killed.append(victim)

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
