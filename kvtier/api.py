"""The per-instance admin HTTP API: health, effective config, cache stats, clear, Prometheus /metrics.

It runs in a daemon thread of the serving process (uvicorn), enabled by `admin.port`; the
convention is port 9100 + rank. With `KVTIER_ADMIN_TOKEN` set, every route but /health and
/metrics needs `Authorization: Bearer <token>`; without one it serves only loopback
(auth.check_bind). With `tls.cert` it serves HTTPS. Request bodies over MAX_BODY are refused (413).
FastAPI, uvicorn and prometheus-client are imported only when the API is started.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
import contextlib
import hmac
import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kvtier.config import Config
    from kvtier.engine import CacheEngine


class Node(Protocol):
    """What the API serves: an engine, the config it was built from, and its cluster agent (or None).
    kvtier.node.Node is one; the API does not import it (the node starts the API)."""

    engine: "CacheEngine"
    config: "Config"
    agent: Any
    rank: int


log = logging.getLogger("kvtier.api")
TOKEN_ENV = "KVTIER_ADMIN_TOKEN"  # bearer token of the admin API (not a config key: never printed)
OPEN_PATHS = ("/health", "/metrics")  # routes that need no token (probes and scrapers)
# bytes: largest request body; the largest is a pin or fetch of ~1M chunk hashes (~35 bytes each)
MAX_BODY = 64 * 1024 * 1024


def create_admin_app(node: "Node", token: str = "", max_body: int = MAX_BODY) -> Any:
    """The FastAPI application of one instance's admin API (the engine of `node`, and its agent)."""
    from fastapi import Depends, FastAPI, HTTPException, Request

    def check(request: Request) -> None:
        if token and request.url.path not in OPEN_PATHS:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                raise HTTPException(401, "missing or wrong bearer token")

    app = FastAPI(title="kvtier instance", docs_url=None, redoc_url=None, dependencies=[Depends(check)])
    app.add_middleware(BodyLimit, max_body=max_body)
    _read_routes(app, node)
    _cache_routes(app, node)
    return app


def _read_routes(app: Any, node: "Node") -> None:
    """health, config, stats, metrics."""
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from kvtier.metrics import engine_registry

    engine = node.engine
    registry = engine_registry(engine, lambda: node.agent)
    started = time.monotonic()

    @app.get("/health")
    def health() -> dict[str, Any]:
        agent = node.agent
        cluster = None if agent is None else {"registered": agent.registered, "synced": agent.synced}
        return {"status": "ok", "model": engine.model_id, "rank": node.rank,
                "uptime_s": round(time.monotonic() - started, 1), "cluster": cluster}  # fmt: skip

    @app.get("/config")
    def config() -> dict[str, Any]:
        return {**node.config.to_dict(), "namespace": engine.hasher.namespace.hex()}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        return engine.stats()

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _cache_routes(app: Any, node: "Node") -> None:
    """clear, pin, unpin, fetch (a move's destination side)."""
    from fastapi import HTTPException

    from kvtier.cluster.peer import peer_tls

    engine = node.engine
    peer_timeout = node.config.cluster.peer_timeout_ms / 1e3
    p2p_tls = peer_tls(node.config.tls)  # built once: a CA file that cannot be read fails the start

    @app.post("/clear")
    def clear() -> dict[str, Any]:
        return {"removed": engine.clear()}

    @app.post("/pin")
    def pin(body: dict[str, Any]) -> dict[str, Any]:
        keys = _keys(body)
        if engine.chain.l1 is None:
            raise HTTPException(409, "this instance has no L1 to pin chunks in")
        engine.chain.l1.pin(keys)
        return {"keys": len(keys)}

    @app.post("/unpin")
    def unpin(body: dict[str, Any]) -> dict[str, Any]:
        return {"keys": 0 if engine.chain.l1 is None else engine.chain.l1.unpin(_keys(body))}

    @app.post("/fetch")
    def fetch(body: dict[str, Any]) -> dict[str, Any]:
        from kvtier.cluster.move import FetchRefused, check_peer, fetch_from

        keys = _keys(body)
        agent = node.agent  # its controller says which addresses are peers
        try:
            check_peer(None if agent is None else agent.controller, "" if agent is None else agent.reg.id,
                       body.get("address"), node.config.cluster.timeout_ms / 1e3)  # fmt: skip
        except FetchRefused as exc:
            raise HTTPException(exc.status, str(exc)) from None
        return {"stored": fetch_from(engine, body["address"], keys, peer_timeout, p2p_tls)}


def _keys(body: dict[str, Any]) -> list[Any]:
    """The chunk keys of a {"namespace": hex, "hashes": [digest hex]} body; ValueError if malformed."""
    from fastapi import HTTPException

    from kvtier.keys import ChunkKey

    try:
        namespace = bytes.fromhex(body["namespace"])
        keys = [ChunkKey(namespace, bytes.fromhex(h)) for h in body["hashes"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise HTTPException(400, f"expected {{namespace, hashes}}: {exc!r}") from None
    if any(len(k.namespace) != 16 or len(k.digest) != 16 for k in keys):
        raise HTTPException(400, "namespace and hashes are 16 bytes (32 hex digits) each")
    return keys


class BodyLimit:
    """Plain ASGI middleware: refuse a request body over `max_body` bytes (413) before the app reads
    it, by its Content-Length, or, for a body sent without one, once more than that has arrived."""

    def __init__(self, app: Any, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.isdigit():
            await _refuse(send, 400, "malformed Content-Length")
            return
        if length is not None and int(length) > self.max_body:
            await _refuse(send, 413, f"body over {self.max_body} bytes")
            return
        if length is None:  # chunked: read it here, up to the limit, and hand it on whole
            body = bytearray()
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body:
                    await _refuse(send, 413, f"body over {self.max_body} bytes")
                    return
            receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI receive that gives `body` once, then what `receive` gives (a disconnect)."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _refuse(send: Any, status: int, reason: str) -> None:
    body = json.dumps({"detail": reason}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class AdminServer:
    """The admin API served by uvicorn on a daemon thread (HTTPS with a certificate)."""

    def __init__(
        self,
        node: "Node",
        host: str,
        port: int,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        advertise: str = "",
    ) -> None:
        """Serve on host:port; `url` names `advertise` instead of `host` when given (admin.advertise).
        ConfigError if `host` is beyond loopback without $KVTIER_ADMIN_TOKEN, or the certificate
        cannot be loaded; OSError if the port cannot be bound."""
        import uvicorn

        from kvtier.auth import check_bind
        from kvtier.tls import server_context

        token = os.environ.get(TOKEN_ENV, "")
        check_bind("admin API", host, token, f"${TOKEN_ENV}")
        if tls_cert:
            server_context(tls_cert, tls_key, "tls.cert")  # a clear error before uvicorn loads the files
        app = create_admin_app(node, token)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key)  # fmt: skip
        self.server = uvicorn.Server(config)
        shown = advertise or host  # what the controller is told (a wildcard bind is no address to reach)
        self.url = f"{'https' if tls_cert else 'http'}://{f'[{shown}]' if ':' in shown else shown}:{port}"
        self._thread = threading.Thread(target=self._serve, name="kvtier-admin", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise OSError(f"admin API could not listen on {host}:{port} (see the log)")
        log.info("admin API on %s", self.url)

    def _serve(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind; it logged why, and __init__ raises
            self.server.run()

    def close(self) -> None:
        """Stop serving."""
        self.server.should_exit = True
        self._thread.join(5)
