"""Controller actions carried out by the instances: clear, pin, unpin, move.

The controller owns no KV; it asks instances' admin APIs (`admin_url`) to act, and their tiers'
evictions and admissions come back as KV events. Each call reports per instance what happened or
why not (no admin API, not alive, an HTTP error), never a bare failure. An https:// admin API's
certificate is checked with the controller's `--tls-ca` (and `--tls-no-verify`).
"""

from __future__ import annotations

import json
import os
import ssl
from typing import Any

from kvtier.cluster.state import ControllerState, Instance
from kvtier.units import KiB

ADMIN_TOKEN_ENV = "KVTIER_ADMIN_TOKEN"  # sent to the instances' admin APIs
TIMEOUT = 60.0  # seconds an instance may take to act (a clear or a move of many chunks)
MAX_ANSWER = 64 * KiB  # bytes: an admin API answers {field: count} (or an error's reason); more is refused


def targets(state: ControllerState, instance: str | None) -> list[Instance]:
    """The live instances an action applies to: `instance`, or all; LookupError if it is not live."""
    insts = [i for i in state.instances.values() if instance in (None, i.reg.id) and state.alive(i)]
    if instance is not None and not insts:
        raise LookupError(f"no live instance {instance!r}")
    return insts


async def post_all(
    insts: list[Instance], path: str, payload: dict[str, Any], field: str, tls: ssl.SSLContext | None = None
) -> dict[str, Any]:
    """POST `payload` to `path` of each instance's admin API; per instance its answer's `field`, or why
    not. `tls` checks https:// admin APIs (None: the system's CAs)."""
    import httpx

    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=TIMEOUT, headers=headers, verify=tls or True) as client:
        for inst in insts:
            if not inst.reg.admin_url:
                out[inst.reg.id] = "no admin API (admin.port is 0)"
                continue
            try:
                out[inst.reg.id] = await _post(client, inst.reg.admin_url + path, payload, field)
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                out[inst.reg.id] = f"failed: {exc!r}"
    return out


async def _post(client: Any, url: str, payload: dict[str, Any], field: str) -> Any:
    """The `field` of the JSON answer to a POST, read up to MAX_ANSWER bytes; ValueError if more,
    an httpx error for an error status (with the answer's reason)."""
    async with client.stream("POST", url, json=payload) as response:
        body = bytearray()
        async for piece in response.aiter_bytes():
            body += piece
            if len(body) > MAX_ANSWER:
                raise ValueError(f"{url}: answer over {MAX_ANSWER} bytes")
        if response.is_error:
            raise ValueError(f"{url}: HTTP {response.status_code} {bytes(body[:200])!r}")
        return json.loads(body)[field]


async def move(
    state: ControllerState, source: str, dest: str, namespace: str, digests: list[str], tls: ssl.SSLContext | None
) -> dict[str, Any]:
    """Have `dest` copy the chunks `digests` from `source` (P2P); how many it stored."""
    src, dst = targets(state, source)[0], targets(state, dest)[0]
    if not src.reg.address:
        raise ValueError(f"instance {source!r} serves no chunks to peers (cluster.advertise is empty)")
    payload = {"address": src.reg.address, "namespace": namespace, "hashes": digests}
    answer = await post_all([dst], "/fetch", payload, "stored", tls)
    return {"from": source, "to": dest, "stored": answer[dest]}
