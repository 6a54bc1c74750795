"""The controller's HTTP API (FastAPI): registration, heartbeats, events, snapshots, lookups.

Instances send event batches and snapshots as msgpack (keys are raw bytes); everything else is
JSON. Every handler is `async` and runs on the event loop thread, so the state needs no lock.
A request body over `max_body` is refused (413); with a token, every request but /health and the
dashboard page must carry `Authorization: Bearer <token>` (401). Without a token the app refuses to
be built for a host beyond loopback (auth.check_bind). Malformed input is a 4xx with the reason.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations, and `Request`
# is imported inside create_app (fastapi is optional), where only evaluated annotations can see it.
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvtier.auth import check_bind
from kvtier.cluster import forward
from kvtier.cluster.events import TIER_NAMES
from kvtier.cluster.state import ControllerState, Instance, Registration
from kvtier.tls import client_context
from kvtier.units import MiB

log = logging.getLogger("kvtier.cluster.app")
TOKEN_ENV = "KVTIER_CONTROLLER_TOKEN"  # the shared secret of the controller and its instances
TOKEN_OPTION = f"--token-file or ${TOKEN_ENV}"  # how a controller is given its token (in errors)
MSGPACK = "application/msgpack"
OPEN_PATHS = ("/health", "/")  # no token needed: a probe, and the dashboard page (it holds no data)


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """Where the controller listens and the limits it enforces."""

    host: str = "127.0.0.1"  # interface to bind; loopback unless told otherwise
    port: int = 9000  # HTTP port; 0 picks a free one (tests)
    missed_beats: int = 3  # heartbeats an instance may miss before it is marked dead
    max_body: int = 256 * MiB  # bytes: largest request body (a snapshot of ~8M chunks)
    max_lookup: int = 1 << 20  # tokens or hashes in one lookup
    token: str = field(default="", repr=False)  # bearer token every request must carry; "" = no auth
    tls_cert: str | None = None  # PEM certificate chain to serve HTTPS with; None = plain HTTP
    tls_key: str | None = None  # PEM private key of tls_cert; None = in the cert file
    tls_ca: str | None = None  # PEM CA bundle to check https:// admin APIs with; None = the system's
    tls_verify: bool = True  # check the admin APIs' certificates and host names (False: encryption only)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.tls_key and not self.tls_cert:
            raise ValueError("--tls-key given without --tls-cert")
        for name in ("missed_beats", "max_body", "max_lookup"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class _Events(msgspec.Struct):
    id: str
    seq: int
    events: bytes


class _Heartbeat(msgspec.Struct):
    id: str
    stats: dict[str, float] | None = None  # counters and gauges for the dashboard (see agent.py)


class _Snapshot(msgspec.Struct):
    id: str
    seq: int
    tiers: dict[str, bytes]


class _Lookup(msgspec.Struct, forbid_unknown_fields=True):
    tokens: list[int] | None = None  # token ids (chunked like the instances of `model`/`namespace`)
    hashes: list[str] | None = None  # chunk digests, hex (with `namespace`)
    namespace: str | None = None
    model: str | None = None


def create_app(config: ControllerConfig, state: ControllerState | None = None) -> Any:
    """The FastAPI application of a controller; ConfigError if it may not serve `config.host`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from kvtier.cluster.metrics import controller_registry

    check_bind("kvtier controller", config.host, config.token, TOKEN_OPTION)
    tls = client_context(config.tls_ca, config.tls_verify, "--tls-ca")  # for forwarded actions to https:// admin APIs
    state = state or ControllerState(config.missed_beats)
    registry, lookup_latency = controller_registry(state)
    app = FastAPI(title="kvtier controller", docs_url=None, redoc_url=None)
    app.state.kv = state
    app.add_middleware(_Guard, config=config)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError) -> Any:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(LookupError)
    async def not_found(request: Request, exc: LookupError) -> Any:
        return JSONResponse({"detail": str(exc.args[0] if exc.args else exc)}, status_code=404)

    decode = _decoder(config.max_body)
    _membership_routes(app, state, decode)
    _query_routes(app, state, config.max_lookup, decode, lookup_latency)
    _action_routes(app, state, config.max_lookup, decode, tls)
    _page_routes(app, state, registry)
    return app


def _decoder(max_body: int) -> Callable[..., Awaitable[Any]]:
    """`await decode(request, Type, "json" | "msgpack")`: the body, at most `max_body` bytes, as Type (400 if not)."""
    from fastapi import HTTPException, Request

    async def decode(request: Request, kind: type, fmt: str = "json") -> Any:
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > max_body:
                raise HTTPException(413, f"body over {max_body} bytes")
        try:
            return (msgspec.msgpack if fmt == "msgpack" else msgspec.json).decode(data, type=kind)
        except msgspec.ValidationError as exc:
            raise HTTPException(400, f"bad request: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise HTTPException(400, f"bad request body: {exc}") from exc

    return decode


def _membership_routes(app: Any, state: ControllerState, decode: Any) -> None:
    """What instances call: register, heartbeat, events, snapshot."""
    from fastapi import Request

    @app.post("/register")
    async def register(request: Request) -> dict[str, Any]:
        inst = state.register(await decode(request, Registration))
        log.info("instance %s registered (slot %d, %s)", inst.reg.id, inst.slot, inst.reg.address or "no address")
        return {"status": "resync", "slot": inst.slot}

    @app.post("/heartbeat")
    async def heartbeat(request: Request) -> dict[str, Any]:
        beat = await decode(request, _Heartbeat)
        return {"status": state.heartbeat(beat.id, beat.stats)}

    @app.post("/events")
    async def events(request: Request) -> dict[str, Any]:
        msg = await decode(request, _Events, "msgpack")
        return {"status": state.ingest(msg.id, msg.seq, msg.events)}

    @app.post("/snapshot")
    async def snapshot(request: Request) -> dict[str, Any]:
        msg = await decode(request, _Snapshot, "msgpack")
        return {"status": state.snapshot(msg.id, msg.seq, msg.tiers)}


def _query_routes(app: Any, state: ControllerState, max_lookup: int, decode: Any, latency: Any) -> None:
    """What routers and operators read: health, lookup, holders, instances."""
    from fastapi import HTTPException, Request
    from fastapi.responses import JSONResponse, Response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        alive = sum(state.alive(i) for i in state.instances.values())
        return {"status": "ok", "instances": len(state.instances), "alive": alive, "chunks": len(state.index)}

    @app.post("/lookup")
    async def lookup(request: Request) -> Response:
        req = await decode(request, _Lookup)
        with latency.time():
            return JSONResponse(_lookup(state, req, max_lookup))

    @app.post("/holders")
    async def holders(request: Request) -> dict[str, Any]:
        return _holders(state, await decode(request, _Lookup), max_lookup)

    @app.get("/instances")
    async def instances() -> list[dict[str, Any]]:
        return [_describe(state, inst) for inst in state.instances.values()]

    @app.delete("/instances/{instance_id}")
    async def remove(instance_id: str) -> dict[str, Any]:
        if not state.remove(instance_id):
            raise HTTPException(404, f"no instance {instance_id!r}")
        return {"status": "ok"}


def _action_routes(app: Any, state: ControllerState, max_lookup: int, decode: Any, tls: ssl.SSLContext) -> None:
    """What the instances carry out (forward.py): clear, pin, unpin, move."""
    from fastapi import Request

    @app.post("/clear")
    async def clear(request: Request) -> dict[str, Any]:
        target = (await decode(request, dict[str, str | None])).get("instance")
        return {"cleared": await forward.post_all(forward.targets(state, target), "/clear", {}, "removed", tls)}

    @app.post("/pin")
    async def pin(request: Request) -> dict[str, Any]:
        return await _pin(state, await decode(request, _Action), "/pin", tls)

    @app.post("/unpin")
    async def unpin(request: Request) -> dict[str, Any]:
        return await _pin(state, await decode(request, _Action), "/unpin", tls)

    @app.post("/move")
    async def move(request: Request) -> dict[str, Any]:
        req = await decode(request, _Action)
        if req.source is None or req.dest is None:
            raise ValueError("a move needs 'source' and 'dest' instance ids")
        namespace, digests = _digests(state, req, max_lookup)
        return await forward.move(state, req.source, req.dest, namespace, digests, tls)


def _page_routes(app: Any, state: ControllerState, registry: Any) -> None:
    """The dashboard, the history it draws, and Prometheus metrics."""
    from fastapi.responses import Response

    @app.get("/")
    async def dashboard() -> Response:
        from kvtier.cluster.dashboard import PAGE

        return Response(PAGE, media_type="text/html; charset=utf-8")

    @app.get("/history")
    async def history() -> dict[str, Any]:
        now = state.clock()
        return {i.reg.id: [[round(t - now, 3), s] for t, s in i.history] for i in state.instances.values()}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class _Guard:
    """Plain ASGI middleware (cheaper than BaseHTTPMiddleware): bearer token and body size checks."""

    def __init__(self, app: Any, config: ControllerConfig) -> None:
        self.app = app
        self.expected = f"Bearer {config.token}".encode()
        self.config = config

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            refusal = None
            sent = headers.get(b"authorization", b"")
            if self.config.token and scope["path"] not in OPEN_PATHS and not hmac.compare_digest(sent, self.expected):
                refusal = 401, "missing or wrong bearer token"
            length = headers.get(b"content-length", b"0")
            if refusal is None and not length.isdigit():
                refusal = 400, "malformed Content-Length"
            elif refusal is None and int(length) > self.config.max_body:
                refusal = 413, f"body over {self.config.max_body} bytes"
            if refusal is not None:
                body = msgspec.json.encode({"detail": refusal[1]})
                await send({"type": "http.response.start", "status": refusal[0],
                            "headers": [(b"content-type", b"application/json")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _lookup(state: ControllerState, req: _Lookup, limit: int) -> dict[str, Any]:
    """Answer a lookup by tokens or by chunk digests."""
    if (req.tokens is None) == (req.hashes is None):
        raise ValueError("give either tokens or hashes")
    if len(req.tokens or req.hashes or ()) > limit:
        raise ValueError(f"at most {limit} tokens or hashes per lookup")
    ends: list[int] | None = None
    if req.tokens is not None:
        chunks = state.hasher_for(req.model, req.namespace).chunks(req.tokens)
        keys = [c.key.namespace + c.key.digest for c in chunks]
        ends = [c.end for c in chunks]
    else:
        if req.namespace is None:
            raise ValueError("a lookup by hashes needs the namespace")
        ns = bytes.fromhex(req.namespace)
        keys = [ns + bytes.fromhex(h) for h in req.hashes or ()]
    result = state.lookup_keys(keys)
    ranked = sorted(result.prefixes.items(), key=lambda item: (-item[1], item[0] != result.best))
    out: list[dict[str, Any]] = []
    for iid, n in ranked:
        entry: dict[str, Any] = {"id": iid, "chunks": n, "address": state.instances[iid].reg.address}
        if ends is not None:
            entry["tokens"] = ends[n - 1]
        out.append(entry)
    best_tokens = (out[0]["tokens"] if out else 0) if ends is not None else None
    return {"chunks": result.chunks, "best": result.best, "best_tokens": best_tokens, "instances": out}


class _Action(_Lookup, forbid_unknown_fields=True):
    instance: str | None = None  # pin/unpin: only this instance (default: every live one)
    source: str | None = None  # move: the instance that has the chunks
    dest: str | None = None  # move: the instance that copies them


def _digests(state: ControllerState, req: _Lookup, limit: int) -> tuple[str, list[str]]:
    """(namespace hex, digests hex) named by a request's tokens or hashes."""
    if (req.tokens is None) == (req.hashes is None):
        raise ValueError("give either tokens or hashes")
    if len(req.tokens or req.hashes or ()) > limit:
        raise ValueError(f"at most {limit} tokens or hashes per request")
    if req.tokens is not None:
        hasher = state.hasher_for(req.model, req.namespace)
        return hasher.namespace.hex(), [c.key.digest.hex() for c in hasher.chunks(req.tokens)]
    if req.namespace is None:
        raise ValueError("hashes need the namespace")
    hashes = list(req.hashes or ())
    if len(bytes.fromhex(req.namespace)) != 16 or any(len(bytes.fromhex(h)) != 16 for h in hashes):
        raise ValueError("the namespace and each hash are 16 bytes (32 hex digits)")
    return req.namespace, hashes


async def _pin(state: ControllerState, req: _Action, path: str, tls: ssl.SSLContext) -> dict[str, Any]:
    """Pin (or unpin) chunks in the L1 of one or every live instance; per instance, keys affected."""
    namespace, digests = _digests(state, req, 1 << 20)
    payload = {"namespace": namespace, "hashes": digests}
    answer = await forward.post_all(forward.targets(state, req.instance), path, payload, "keys", tls)
    return {"pinned" if path == "/pin" else "unpinned": answer}


def _holders(state: ControllerState, req: _Lookup, limit: int) -> dict[str, Any]:
    """Which live instances hold each chunk, and in which tiers."""
    if req.namespace is None or req.hashes is None or len(req.hashes) > limit:
        raise ValueError(f"give a namespace and at most {limit} hashes")
    ns = bytes.fromhex(req.namespace)
    by_slot = {i.slot: i for i in state.instances.values() if state.alive(i)}
    out = []
    for digest in req.hashes:
        found = state.index.holders(ns + bytes.fromhex(digest))
        out.append({by_slot[s].reg.id: [TIER_NAMES[t] for t in tiers] for s, tiers in found.items() if s in by_slot})
    return {"holders": out}


def _describe(state: ControllerState, inst: Instance) -> dict[str, Any]:
    counts = state.index.counts.get(inst.slot, [0, 0])
    reg = inst.reg
    return {
        "id": reg.id, "model": reg.model, "namespace": reg.namespace, "address": reg.address,
        "admin_url": reg.admin_url, "alive": state.alive(inst), "synced": inst.seq is not None,
        "seq": inst.seq, "chunks": {"l1": counts[0], "l2": counts[1]}, "events": inst.events,
        "resyncs": inst.resyncs, "silent_s": round(state.clock() - inst.last_seen, 3),
    }  # fmt: skip
