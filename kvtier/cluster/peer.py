"""P2P: an instance serves its own L1 and disk chunks to peers, and fetches chunks it lacks from them.

Serving: `PeerObjects` makes an engine's tiers look like the kvtier server's ObjectCache, read-only,
so the kvtier server (protocol, limits, auth: docs/protocol.md) runs unchanged over them at
`cluster.advertise`. An L1 chunk is framed on the fly (header + payload, with its checksum); a disk
chunk is sent as the file's bytes.

Fetching: `PeerStore` is an ObjectStore for RemoteTier. `exists` asks the controller which live
instance (other than this one) holds the longest prefix of the keys and remembers it; `get` fetches
them from that peer with the kvtier client. RemoteTier frames nothing new but validates every object
(key, layout, checksum) and enforces the deadlines. Each peer has its own circuit breaker: a dead or
slow peer costs one deadline, then it is skipped (its back-off doubling per failed trial) and the
next lookup picks the best of the other peers, while the chain falls back to other tiers or to
recompute. A failing controller, on the other hand, pauses the whole peer tier (RemoteTier's breaker).
Lookup answers are read up to MAX_LOOKUP_ANSWER. P2P uses TLS when the instances have a `tls.cert`
(`peer_tls`). Moves (the admin API's /fetch) are cluster/move.py.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvtier.cluster.address import split_address
from kvtier.cluster.client import ControllerClient, ControllerUnavailable
from kvtier.codec import Codec
from kvtier.codec.framing import encode_object
from kvtier.config import ClusterConfig, TLSConfig
from kvtier.errors import ConfigError
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.server.connection import PoolBusy
from kvtier.storage.cpu import CPUTier
from kvtier.storage.filetier import FileTier
from kvtier.storage.remote.breaker import Breaker
from kvtier.storage.remote.store import Buffer, MemberDown, StoreOptions
from kvtier.units import MiB

log = logging.getLogger("kvtier.cluster.peer")
# bytes: largest /lookup answer read. It lists each live instance holding a prefix (~150 bytes
# each), so 8 MiB is ~50,000 instances; a larger answer is a failed lookup, not an allocation.
MAX_LOOKUP_ANSWER = 8 * MiB


class PeerObjects:
    """An engine's L1 and disk tier as a read-only ObjectCache of framed objects (for KVServer)."""

    def __init__(self, l1: CPUTier | None, disk: FileTier | None, layout: KVLayout, codec: Codec) -> None:
        self.l1, self.disk, self.layout, self.codec = l1, disk, layout, codec
        # L1 tensors are never modified, so the header of a raw chunk (with its payload checksum, a
        # pass over the whole chunk) is computed once per tensor, and forgotten with the tensor
        # (tensors compare elementwise, so the memo is keyed by id and checks it still has that tensor)
        self._headers: dict[int, tuple[weakref.ref[torch.Tensor], ChunkKey, bytes]] = {}
        self._lock = threading.RLock()  # _forget may run inside a locked block (a collection)

    def get_memory(self, key: ChunkKey) -> list[Any] | None:
        """L1's chunk framed: [header, payload], the payload a view of the L1 tensor (no copy)."""
        kv = None if self.l1 is None else self.l1.get(key)
        if kv is None:
            return None
        if self.codec.name != "raw":
            return list(encode_object(key, self.layout, self.codec, kv))
        with self._lock:
            known = self._headers.get(id(kv))
        if known is not None and known[0]() is kv and known[1] == key:
            return [known[2], self.codec.encode(kv)]
        header, payload = encode_object(key, self.layout, self.codec, kv)
        with self._lock:
            self._headers[id(kv)] = (weakref.ref(kv, functools.partial(self._forget, id(kv))), key, header)
        return [header, payload]

    def _forget(self, ident: int, ref: weakref.ref[torch.Tensor]) -> None:
        with self._lock:
            if (known := self._headers.get(ident)) is not None and known[0] is ref:
                del self._headers[ident]

    def get_disk(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        """The disk files of `keys` as they are (the fetching peer validates them); blocking."""
        return [self._read_file(key) for key in keys]

    def _read_file(self, key: ChunkKey) -> torch.Tensor | None:
        if self.disk is None:
            return None
        try:
            with open(self.disk.path(key), "rb", buffering=0) as f:
                data = bytearray(f.read())
        except OSError:
            return None  # evicted meanwhile, or never there
        return torch.frombuffer(data, dtype=torch.uint8)

    def in_memory(self, key: ChunkKey) -> bool:
        return self.l1 is not None and self.l1.contains(key)

    def on_disk(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [self.disk is not None and self.disk.contains(key) for key in keys]

    @property
    def has_disk(self) -> bool:
        return self.disk is not None

    def put(self, key: ChunkKey, data: memoryview) -> tuple[bool, bool]:
        """Peers never accept writes (the server answers NO_SPACE)."""
        return False, False

    def delete(self, key: ChunkKey) -> bool:
        return False

    def stats(self) -> dict[str, dict[str, Any]]:
        out = {} if self.l1 is None else {"memory": self.l1.stats.as_dict()}
        return out | ({} if self.disk is None else {"disk": self.disk.stats.as_dict()})

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass  # the engine owns and closes its tiers


class PeerStore:
    """An ObjectStore over the peers the controller points to (read-only)."""

    scheme = "peer"

    def __init__(
        self,
        controller: ControllerClient,
        self_id: str,
        options: StoreOptions | None = None,
        backoff: tuple[float, float] = (0.25, 10.0),
        clock: Callable[[], float] = time.monotonic,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: the client context of TLS P2P ports (`peer_tls`); None = plain TCP."""
        self.where = f"peers via {controller.url}"
        self._tls = tls
        self._controller = controller
        self._self_id = self_id
        self._options = options or StoreOptions()
        self.server_token = ""  # the token peers' kvtier servers expect ($KVTIER_SERVER_TOKEN)
        self._routes: dict[ChunkKey, str] = {}  # key -> peer address, from the last lookups
        self._clients: dict[str, Any] = {}
        self._breakers: dict[str, Breaker] = {}  # peer address -> its own back-off
        self._backoff = backoff
        self._clock = clock
        self._lock = threading.Lock()

    def exists(self, keys: Sequence[ChunkKey], timeout: float) -> list[bool]:
        """The longest prefix of `keys` one live peer holds, by the controller's index."""
        if not keys:
            return []
        body = {"namespace": keys[0].namespace.hex(), "hashes": [k.digest.hex() for k in keys]}
        answer = self._controller.request("/lookup", body, timeout=timeout, limit=MAX_LOOKUP_ANSWER)
        try:
            peer = next((e for e in answer["instances"] if e["id"] != self._self_id and e["address"]
                         and self._breaker(e["address"]).allow()), None)  # fmt: skip  # best first
            n = 0 if peer is None else min(int(peer["chunks"]), len(keys))
        except (KeyError, TypeError, ValueError) as exc:
            raise ControllerUnavailable(f"/lookup: malformed answer ({exc!r})") from None
        with self._lock:
            if len(self._routes) > 65536:
                self._routes.clear()  # routes are hints for the get that follows a lookup
            for key in keys[:n]:
                self._routes[key] = peer["address"] if peer else ""
        return [True] * n + [False] * (len(keys) - n)

    def get(self, keys: Sequence[ChunkKey], timeout: float) -> list[Buffer | None]:
        """Fetch `keys` from the peer the last lookup chose (None for keys without a route)."""
        with self._lock:
            address = self._routes.get(keys[0], "") if keys else ""
        breaker = self._breaker(address) if address else None
        if breaker is None or not breaker.allow():
            return [None] * len(keys)
        try:
            got = self._client(address).get(keys, timeout)
        except PoolBusy as exc:  # our own connections were all busy: not the peer's fault
            raise MemberDown(f"peer {address}: {exc}") from exc
        except Exception as exc:
            pause = breaker.failure()
            raise MemberDown(f"peer {address}: {type(exc).__name__}: {exc}; skipping it for {pause:.2f} s") from exc
        breaker.success()
        return got

    def _breaker(self, address: str) -> Breaker:
        with self._lock:
            breaker = self._breakers.get(address)
            if breaker is None:
                if len(self._breakers) > 4096:  # instances come and go: keep only paused peers
                    self._breakers = {a: b for a, b in self._breakers.items() if b.is_open}
                breaker = self._breakers[address] = Breaker(*self._backoff, self._clock)
            return breaker

    def _client(self, address: str) -> Any:
        from kvtier.server.client import KVTierClient

        with self._lock:
            client = self._clients.get(address)
            if client is None:
                host, port = split_address(address, "peer address")
                client = self._clients[address] = KVTierClient(host, port, self.server_token, self._options,
                                                               tls=self._tls)  # fmt: skip
            return client

    def put(self, key: ChunkKey, parts: Sequence[Buffer], timeout: float) -> None:
        raise NotImplementedError("peers are read-only")  # never called: the chain has no writer for it

    def delete(self, key: ChunkKey, timeout: float) -> bool:
        return False

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


def peer_tls(tls: TLSConfig) -> ssl.SSLContext | None:
    """The client context for peers' P2P ports, or None for plain TCP.

    P2P is TLS cluster-wide or nowhere: an instance configured with `tls.cert` serves its P2P port
    over TLS and expects every peer to do so too (checking their certificates with `tls.ca` and
    `tls.verify`); one without it speaks plain TCP to peers. So give every instance of a cluster a
    `tls.cert`, or none of them.
    """
    return tls.client().context() if tls.cert else None


def serve_peers(engine: Any, host: str, port: int, tls: TLSConfig | None = None) -> Any:
    """Start a kvtier server over the engine's L1 and disk tier on host:port (TLS with `tls.cert`);
    the ServerThread. ConfigError beyond loopback without $KVTIER_SERVER_TOKEN."""
    from kvtier.codec import get_codec
    from kvtier.server.client import TOKEN_ENV
    from kvtier.server.config import ServerConfig
    from kvtier.server.server import ServerThread

    tls = tls or TLSConfig()
    chain = engine.chain
    disk = next((t for t in chain.lower if isinstance(t, FileTier)), None)
    objects = PeerObjects(chain.l1, disk, engine.layout, get_codec(engine.config.codec))
    config = ServerConfig(host=host.strip("[]"), port=port, token=os.environ.get(TOKEN_ENV, ""), name="P2P port",
                          tls_cert=tls.cert, tls_key=tls.key)  # fmt: skip
    thread = ServerThread(config, objects).start()  # type: ignore[arg-type]  # duck-typed ObjectCache
    log.info("serving chunks to peers on %s", thread.url)
    return thread


def add_peer_tier(engine: Any, cfg: ClusterConfig, tls: TLSConfig | None = None) -> None:
    """Add a read-only "peer" tier to the engine's chain, after its disk tier and before a remote one;
    `cfg` names the controller and this instance (not itself a peer), `tls` how to check the
    controller and peers (Config.tls)."""
    from kvtier.cluster.app import TOKEN_ENV as CONTROLLER_TOKEN_ENV
    from kvtier.codec import get_codec
    from kvtier.server.client import TOKEN_ENV
    from kvtier.storage.remote.tier import RemoteOptions, RemoteTier

    if cfg.controller_url is None:
        raise ConfigError("cluster.peer_fetch: needs a controller_url (the controller says which peer has what)")
    tls = tls or TLSConfig()
    controller = ControllerClient(cfg.controller_url, os.environ.get(CONTROLLER_TOKEN_ENV, ""),
                                  tls.client())  # fmt: skip
    options = RemoteOptions(lookup_timeout=cfg.peer_lookup_timeout_ms / 1e3, timeout=cfg.peer_timeout_ms / 1e3)
    store = PeerStore(controller, cfg.instance_id, backoff=(options.backoff, options.backoff_max),
                      tls=peer_tls(tls))  # fmt: skip
    store.server_token = os.environ.get(TOKEN_ENV, "")
    tier = RemoteTier(store, engine.layout, get_codec(engine.config.codec), options,
                      engine_codec=engine.config.codec, name="peer")  # fmt: skip
    position = sum(1 for t in engine.chain.lower if isinstance(t, FileTier))
    engine.chain.add_reader(tier, position)
