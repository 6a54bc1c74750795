"""The destination side of a move: the admin API's /fetch copies chunks from a registered peer.

/fetch is given an address by its caller (the controller, for `POST /move`). An instance that
connected wherever it is told would let anyone who reaches its admin API make it open connections
to any host and port, and read what answers there. So before connecting it asks its controller
(`GET /instances`) and goes on only if the address is the advertised `address` of a live
registered instance other than itself; an instance without a controller refuses every /fetch.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from typing import Any

from kvtier.cluster.address import split_address
from kvtier.cluster.client import ControllerClient, ControllerUnavailable
from kvtier.keys import ChunkKey
from kvtier.units import MiB

# bytes: largest /instances answer read; an instance is described in ~400 bytes, so 16 MiB is
# ~40,000 instances. A larger answer refuses the fetch (503) instead of being allocated.
MAX_INSTANCES_ANSWER = 16 * MiB


class FetchRefused(Exception):
    """A /fetch that is not carried out; `status` is the HTTP status the admin API answers."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status  # 400 bad address, 403 not a registered peer, 409 no controller, 503 no answer


def check_peer(controller: ControllerClient | None, self_id: str, address: object, timeout: float) -> tuple[str, int]:
    """(host, port) of `address` if the controller lists it as a live instance other than `self_id`;
    FetchRefused saying why not."""
    try:
        target = split_address(address)
    except ValueError as exc:
        raise FetchRefused(400, str(exc)) from None
    if controller is None:
        raise FetchRefused(409, "this instance has no controller (cluster.controller_url) to check that "
                                "the address is a registered peer's")  # fmt: skip
    try:
        listed = controller.request("/instances", timeout=timeout, limit=MAX_INSTANCES_ANSWER)
    except ControllerUnavailable as exc:
        raise FetchRefused(503, f"cannot ask the controller whether {address!r} is a peer: {exc}") from None
    if not isinstance(listed, list) or not all(isinstance(i, dict) for i in listed):
        raise FetchRefused(503, "the controller's /instances answer is not a list of instances")
    matches = [i for i in listed if _address_of(i) == target]
    if any(i.get("alive") is True and i.get("id") != self_id for i in matches):
        return target
    if any(i.get("id") == self_id for i in matches):
        why = "is this instance's own address"
    elif matches:
        why = "is the address of an instance that is not alive"
    else:
        why = "is not the address of any instance registered with the controller"
    raise FetchRefused(403, f"{address!r} {why}")


def _address_of(instance: dict[str, Any]) -> tuple[str, int] | None:
    try:
        return split_address(instance.get("address"))
    except ValueError:
        return None  # no address (it serves no peers) or one that is no host:port


def fetch_from(
    engine: Any, address: str, keys: Sequence[ChunkKey], timeout: float, tls: ssl.SSLContext | None = None
) -> int:
    """Copy the leading `keys` a peer at `address` holds into this engine (L1 now, lower tiers
    asynchronously), validated like every peer fetch, each batch within `timeout` seconds; how many
    were stored. `tls`: the client context of a TLS P2P port (peer.peer_tls)."""
    from kvtier.codec import get_codec
    from kvtier.server.client import TOKEN_ENV, KVTierClient
    from kvtier.storage.remote.tier import RemoteOptions, RemoteTier

    host, port = split_address(address)
    client = KVTierClient(host, port, os.environ.get(TOKEN_ENV, ""), tls=tls)
    tier = RemoteTier(client, engine.layout, get_codec(engine.config.codec), RemoteOptions(timeout=timeout),
                      engine_codec=engine.config.codec, name="move")  # fmt: skip
    stored = 0
    try:
        for key, kv in zip(keys, tier.get_many(keys), strict=True):
            if kv is None:
                break
            engine.chain.store(key, kv)
            stored += 1
    finally:
        tier.close()
    return stored
