"""Requests to the controller: the agent's reports, the peer tier's lookups, the admin /fetch check.

Each request carries the controller's bearer token, runs under a timeout, speaks TLS to an
https:// controller (checking its certificate against `tls.ca`, or the system's CAs), and reads
the answer up to a bound given by the caller: a larger answer is an error, not an allocation.
Every failure raises ControllerUnavailable with the reason.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any, BinaryIO

import msgspec

from kvtier.cluster.app import MSGPACK
from kvtier.tls import ClientTLS
from kvtier.units import KiB, MiB

PIECE = 1 * MiB  # bytes read at a time, so that a bound of many MiB allocates only what arrives
MAX_STATUS_ANSWER = 64 * KiB  # bytes: register/heartbeat/events/snapshot answers are tens of bytes


class ControllerUnavailable(Exception):
    """The controller did not answer usefully: network or TLS error, timeout, error status, or an
    answer over its bound."""


def read_bounded(stream: BinaryIO | Any, limit: int, what: str) -> bytes:
    """All of `stream` if it holds at most `limit` bytes; ControllerUnavailable (after reading
    `limit` + 1 bytes, no more) if it holds more."""
    data = bytearray()
    while len(data) <= limit:
        piece = stream.read(min(PIECE, limit + 1 - len(data)))
        if not piece:
            return bytes(data)
        data += piece
    raise ControllerUnavailable(f"{what}: answer over {limit} bytes")


class ControllerClient:
    """Blocking JSON requests to one controller (urllib; safe to share between threads)."""

    def __init__(self, url: str, token: str = "", tls: ClientTLS | None = None) -> None:
        self.url = url.rstrip("/")
        self._token = token
        # built once (it reads the CA file); an http:// controller needs none
        self._context: ssl.SSLContext | None = (
            (tls or ClientTLS()).context() if self.url.startswith("https://") else None
        )

    def request(self, path: str, payload: Any = None, *, timeout: float, limit: int, msgpack: bool = False) -> Any:
        """POST `payload` (JSON, or msgpack) to `path`, or GET `path` when it is None; the JSON
        answer, read up to `limit` bytes."""
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        data = None
        if payload is not None:
            data = msgspec.msgpack.encode(payload) if msgpack else json.dumps(payload).encode()
            headers["Content-Type"] = MSGPACK if msgpack else "application/json"
        method = "GET" if payload is None else "POST"
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self._context) as response:
                if int(response.headers.get("Content-Length") or 0) > limit:
                    raise ControllerUnavailable(f"{path}: answer of {response.headers['Content-Length']} bytes, "
                                                f"over {limit}")  # fmt: skip
                return json.loads(read_bounded(response, limit, path))
        except urllib.error.HTTPError as exc:
            raise ControllerUnavailable(f"{path}: HTTP {exc.code} {exc.read(200)!r}") from None
        except (OSError, ValueError) as exc:  # URLError, TLS errors, timeouts and resets are OSErrors
            raise ControllerUnavailable(f"{path}: {exc}") from None
