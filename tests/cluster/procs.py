"""Real processes for the cluster tests: a controller and cache instances on loopback."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVTIER_", "LMCACHE_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env | extra


class Controller:
    """`kvtier controller` on a free loopback port (HTTPS with `certs`, a token with `token`)."""

    def __init__(self, missed_beats: int = 3, certs: Any = None, token: str = "", args: tuple[str, ...] = ()) -> None:
        self.missed_beats = missed_beats
        self.args = args
        self.token = token
        self.context = None if certs is None else ssl.create_default_context(cafile=certs.ca)
        if certs is not None:
            self.args += ("--tls-cert", certs.cert, "--tls-key", certs.key, "--tls-ca", certs.ca)
        self.restart(free_port())

    def restart(self, port: int) -> None:
        """Start (again) on `port`; a restarted controller knows nothing until instances tell it."""
        self.port = port
        self.url = f"{'https' if self.context else 'http'}://127.0.0.1:{port}"
        args = ["controller", "--port", str(port), "--missed-beats", str(self.missed_beats), "--log-level", "warning"]
        env = _env({"KVTIER_CONTROLLER_TOKEN": self.token} if self.token else {})
        self.proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", *args, *self.args], env=env, cwd=ROOT)
        wait_for(lambda: self.get("/health")["status"] == "ok", 30, "controller start")

    def _open(self, path: str, data: bytes | None = None, method: str = "GET") -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        req = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60, context=self.context) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # closed here: an open TLS connection would delay stop() 30 s
            with exc:
                raise AssertionError(f"{method} {path}: HTTP {exc.code} {exc.read()!r}") from None

    def get(self, path: str) -> Any:
        return self._open(path)

    def post(self, path: str, payload: dict[str, Any]) -> Any:
        return self._open(path, json.dumps(payload).encode(), "POST")

    def instances(self) -> dict[str, dict[str, Any]]:
        return {i["id"]: i for i in self.get("/instances")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Instance:
    """tests/cluster/instance_proc.py: a kvtier Node that reports to the controller."""

    def __init__(
        self,
        instance_id: str,
        controller: Controller,
        l1_size: str,
        disk: Path | None = None,
        admin: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.id = instance_id
        self.admin_url = ""
        config = {"KVTIER_CLUSTER_CONTROLLER_URL": controller.url, "KVTIER_CLUSTER_INSTANCE_ID": instance_id,
                  "KVTIER_CLUSTER_HEARTBEAT_MS": "200", "KVTIER_CLUSTER_FLUSH_MS": "20", "KVTIER_CHUNK_SIZE": "4",
                  "KVTIER_HASH": "xxh128", "KVTIER_L1_SIZE": l1_size}  # fmt: skip
        if disk is not None:
            config |= {"KVTIER_DISK_PATH": str(disk), "KVTIER_DISK_SIZE": "1MiB"}
        config |= extra or {}
        if admin:
            port = free_port()
            config["KVTIER_ADMIN_PORT"] = str(port)
            self.admin_url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster.instance_proc"], env=_env(config), cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert json.loads(self._readline())["ready"]

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"instance {self.id} exited with {self.proc.wait(5)}")
        return line

    def send(self, op: str, **args: Any) -> None:
        """Send a command without waiting for its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        """The answer to the oldest command sent; the instance's events reached the controller."""
        answer = json.loads(self._readline())
        assert answer.pop("synced"), f"{self.id}: events not delivered"
        return answer

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.send(op, **args)
        return self.answer()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()


def http_get(url: str) -> tuple[str, bytes]:
    """(content type, body) of a GET."""
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.headers["Content-Type"], r.read()


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:
            pass  # not up yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
