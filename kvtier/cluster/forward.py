"""Controller actions carried out by the instances: clear, pin, unpin, move.

The controller owns no KV; it asks instances' admin APIs (`admin_url`) to act, and their tiers'
evictions and admissions come back as KV events. Each call reports per instance what happened or
why not (no admin API, not alive, an HTTP error), never a bare failure.
"""

from __future__ import annotations

import os
from typing import Any

from kvtier.cluster.state import ControllerState, Instance

ADMIN_TOKEN_ENV = "KVTIER_ADMIN_TOKEN"  # sent to the instances' admin APIs
TIMEOUT = 60.0  # seconds an instance may take to act (a clear or a move of many chunks)


def targets(state: ControllerState, instance: str | None) -> list[Instance]:
    """The live instances an action applies to: `instance`, or all; LookupError if it is not live."""
    insts = [i for i in state.instances.values() if instance in (None, i.reg.id) and state.alive(i)]
    if instance is not None and not insts:
        raise LookupError(f"no live instance {instance!r}")
    return insts


async def post_all(insts: list[Instance], path: str, payload: dict[str, Any], field: str) -> dict[str, Any]:
    """POST `payload` to `path` of each instance's admin API; per instance its answer's `field`, or why not."""
    import httpx

    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=TIMEOUT, headers=headers) as client:
        for inst in insts:
            if not inst.reg.admin_url:
                out[inst.reg.id] = "no admin API (admin.port is 0)"
                continue
            try:
                response = await client.post(inst.reg.admin_url + path, json=payload)
                response.raise_for_status()
                out[inst.reg.id] = response.json()[field]
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                out[inst.reg.id] = f"failed: {exc!r}"
    return out


async def move(state: ControllerState, source: str, dest: str, namespace: str, digests: list[str]) -> dict[str, Any]:
    """Have `dest` copy the chunks `digests` from `source` (P2P); how many it stored."""
    src, dst = targets(state, source)[0], targets(state, dest)[0]
    if not src.reg.address:
        raise ValueError(f"instance {source!r} serves no chunks to peers (cluster.advertise is empty)")
    payload = {"address": src.reg.address, "namespace": namespace, "hashes": digests}
    answer = await post_all([dst], "/fetch", payload, "stored")
    return {"from": source, "to": dest, "stored": answer[dest]}
