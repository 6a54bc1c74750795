"""The composition root: one Config and KVLayout in, a CacheEngine and the services around it out.

`CacheEngine` builds its tier chain and nothing else. A `Node` builds the engine and, as the config
asks, the services that expose or share it, and stops them in reverse order:

    engine -> peer server (cluster.advertise) -> peer tier (cluster.peer_fetch)
           -> admin API with Prometheus /metrics (admin.port) -> cluster agent (cluster.controller_url)

The agent starts last because its registration names the admin API's URL and the peer address.
With `tls.cert` the admin API serves HTTPS (its registered URL says https://) and the peer server
TLS; the agent, the peer tier and moves check the controller and peers with `tls.ca`/`tls.verify`.
The vLLM and transformers integrations, the demo and the CLI build through here; later services
(shared-memory clients, a disaggregated-prefill channel) are started here too, so there is one
place that knows what runs around an engine.

One machine may run several engines of one model: tensor-parallel ranks. Every service of rank r
is rank-specific, so that no two ranks bind one port or register one instance id: the admin API
listens on `admin.port + r`, the peer server on the advertised port + r (port 0: any free port),
and with more than one rank the cluster instance id is `<cluster.instance_id>-rank<r>` (each rank's
chunks have keys of their own, so each registers as an instance of its own).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from kvtier.config import AdminConfig, ClusterConfig, Config
from kvtier.engine import CacheEngine
from kvtier.layout import KVLayout
from kvtier.units import format_size

log = logging.getLogger("kvtier.node")
WILDCARDS = ("0.0.0.0", "::", "[::]", "")  # bind addresses that name no host


def engine_config(config: Config) -> Config:
    """The part of `config` a CacheEngine uses: the services' sections at their defaults."""
    return config.replace(admin=AdminConfig(), cluster=ClusterConfig())


def rank_port(port: int, rank: int) -> int:
    """Rank `rank`'s port of a service configured at `port` (0, any free port, stays 0)."""
    return port + rank if port else 0


def rank_instance_id(instance_id: str, rank: int, world_size: int) -> str:
    """The cluster instance id of one tensor-parallel rank."""
    return instance_id if world_size == 1 else f"{instance_id}-rank{rank}"


class Node:
    """A CacheEngine and the services its Config asks for, started together and stopped in reverse."""

    def __init__(
        self,
        config: Config | None,
        layout: KVLayout,
        model_id: str = "default",
        *,
        rank: int = 0,
        world_size: int = 1,
        services: bool = True,
    ) -> None:
        """Build the engine; start the services unless `services` is false (`start_services` later)."""
        self.config = config or Config()
        self.rank = rank
        self.world_size = world_size
        self.engine = CacheEngine(engine_config(self.config), layout, model_id, rank=rank, world_size=world_size)
        self.peer_server: Any = None  # a kvtier server over the engine's L1 and disk (cluster.advertise)
        self.admin: Any = None  # the admin HTTP API with /metrics (admin.port)
        self.agent: Any = None  # the cluster agent (cluster.controller_url)
        self.holdings: Any = None  # the L1 keys published to a scheduler in another process (publish_holdings)
        self._started = False
        self._closed = False
        if services:
            self.start_services()

    def start_services(self) -> None:
        """Start what the config asks for (idempotent); on failure, stop what started and raise."""
        if self._started or self._closed:
            return
        self._started = True
        try:
            cluster = self.config.cluster
            if cluster.controller_url is not None:
                self._start_peers(cluster)
            if self.config.admin.port:
                from kvtier.api import AdminServer

                admin, tls = self.config.admin, self.config.tls
                port = rank_port(admin.port, self.rank)
                self.admin = AdminServer(self, admin.host, port, tls.cert, tls.key, admin.advertise)
                if cluster.controller_url is not None and admin.host in WILDCARDS and not admin.advertise:
                    log.warning("admin.host %s is no address the controller can reach from another machine: "
                                "set admin.advertise", admin.host)  # fmt: skip
            if cluster.controller_url is not None:
                self.agent = self._join_cluster(cluster)
        except BaseException:
            self.close()
            raise

    def _start_peers(self, cluster: ClusterConfig) -> None:
        from kvtier.cluster import peer

        if cluster.advertise:
            host, _, port = cluster.advertise.rpartition(":")
            self.peer_server = peer.serve_peers(self.engine, host, rank_port(int(port), self.rank), self.config.tls)
        if cluster.peer_fetch:
            peer.add_peer_tier(self.engine, replace(cluster, instance_id=self.instance_id), self.config.tls)

    def publish_holdings(self, name: str) -> bool:
        """Serve the keys L1 holds, and their changes, on the abstract socket `name` (a scheduler in
        another process mirrors them: cluster/holdings.py); whether it is served (once per node)."""
        if self.holdings is not None or self._closed:
            return self.holdings is not None
        l1 = self.engine.chain.l1
        if l1 is None:
            return False
        from kvtier.cluster.holdings import HoldingsPublisher

        try:
            self.holdings = HoldingsPublisher(l1, name)
        except OSError as exc:
            log.warning("cannot publish L1's keys to the scheduler (%s): its lookups will not see this memory tier",
                        exc)  # fmt: skip
            return False
        return True

    @property
    def instance_id(self) -> str:
        """This engine's id in the cluster (rank-specific under tensor parallelism)."""
        return rank_instance_id(self.config.cluster.instance_id, self.rank, self.world_size)

    def _join_cluster(self, cluster: ClusterConfig) -> Any:
        """Report the engine's L1 and disk chunks to the controller."""
        from kvtier.cluster.agent import ClusterAgent
        from kvtier.cluster.state import Registration

        address = ""
        if self.peer_server is not None:  # the advertised host, the bound port (it may have been 0)
            address = f"{cluster.advertise.rpartition(':')[0]}:{self.peer_server.address[1]}"
        hasher = self.engine.hasher
        reg = Registration(
            id=self.instance_id, model=self.engine.model_id, namespace=hasher.namespace.hex(),
            chunk_size=hasher.chunk_size, hash=hasher.hash_name, save_partial=hasher.save_partial,
            heartbeat_s=cluster.heartbeat_ms / 1000, address=address,
            admin_url="" if self.admin is None else self.admin.url,
        )  # fmt: skip
        tls = self.config.tls.client()  # checks an https:// controller
        return ClusterAgent(replace(cluster, instance_id=self.instance_id), reg, self.engine.local_tiers(),
                            self.heartbeat_stats, tls)  # fmt: skip

    def heartbeat_stats(self) -> dict[str, float]:
        """What the controller's dashboard shows of this engine: lookups, hits, tier usage."""
        c = self.engine.counters
        out = {"lookup_tokens": float(c.lookup_tokens), "hit_tokens": float(c.lookup_hit_tokens)}
        for tier in self.engine.local_tiers():
            out[f"{tier.name}_bytes"] = float(tier.stats.bytes)
            out[f"{tier.name}_capacity"] = float(tier.capacity)
        return out

    def describe(self) -> str:
        """One line naming what runs: the engine's tiers and each started service."""
        local = {id(t): f"{t.name} {format_size(t.capacity)}" for t in self.engine.local_tiers()}
        tiers = [local.get(id(t), t.name) for t in self.engine.chain.tiers]
        parts = [f"tiers {', '.join(tiers) or 'none'}"]
        if self.admin is not None:
            parts.append(f"admin API {self.admin.url}")
        if self.peer_server is not None:
            parts.append(f"peer server {self.peer_server.url}")
        if self.agent is not None:
            parts.append(f"cluster instance {self.instance_id!r} at {self.config.cluster.controller_url}")
        return "; ".join(parts)

    def close(self) -> None:
        """Stop the services in reverse order of their start, then flush and close the engine."""
        if self._closed:
            return
        self._closed = True
        for name in ("holdings", "agent", "admin"):
            service = getattr(self, name)
            if service is not None:
                service.close()
        if self.peer_server is not None:
            self.peer_server.stop()
        self.engine.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
