"""Remote tiers against their raw clients: put/get throughput of 5.9 MB chunks, 32-chunk lookup latency.

Each remote runs on loopback, started by this script (redis-server, a 3-master Redis Cluster, a master
+ replica + sentinel, moto's S3 server, `kvtier server`, `kvtier server` with TLS for kvtiers:// with a
certificate made here, a directory for fs://). For each, kvtier's
RemoteTier (framing, checksums, breaker) is timed against the raw client moving the same framed bytes
with the same batching, alternately in the same run: redis-py (SET, pipelined GETs of 8, pipelined
EXISTS; RedisCluster's pipeline for the cluster, Sentinel.master_for for sentinel), boto3 (put_object,
8 concurrent get_object, concurrent head_object), plain file writes and reads, and kvtier's own
client without the tier (over TLS for kvtiers://; its row against plain kvtier:// is the cost of TLS).
Targets: kvtier >= 0.8x the raw client; kvtier server GET >= redis-server GET; lookup in one round trip.

    python -m benchmarks.remote [--chunks 32] [--repeat 5] [--only redis,redis+cluster,kvtier,kvtiers]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from benchmarks._common import median, paired, report, timeit
from kvtier import KVLayout
from kvtier.codec.framing import encode_object
from kvtier.codec.raw import RawCodec
from kvtier.keys import ChunkKey
from kvtier.storage.remote import open_store
from kvtier.storage.remote.store import object_name
from kvtier.storage.remote.tier import RemoteOptions, RemoteTier
from kvtier.tls import ClientTLS
from tests.remote.redis_groups import SERVICE, RedisClusterGroup, RedisSentinelGroup
from tests.remote.servers import BUCKET, Server, ServerProcess, kvtier_server, redis_server, s3_server, s3_url

TLS: dict[str, ClientTLS] = {}  # URL -> how to check its server (kvtiers://, trusting the CA made here)
LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)
CHUNK = 256
BATCH = RemoteOptions().get_batch


class RawClient:
    """The same operations on the same bytes and objects, straight through a backend's own client.
    Objects are named as the tier names them ("kvtier/<namespace>/<digest>")."""

    def __init__(self, put: Callable[[str, bytes], Any], get_batch: Callable[[list[str]], list[Any]],
                 exists: Callable[[list[str]], list[bool]], ping: Callable[[], Any]) -> None:  # fmt: skip
        self.put, self.get_batch, self.exists, self.ping = put, get_batch, exists, ping

    def put_all(self, names: list[str], blobs: list[bytes]) -> None:
        for name, blob in zip(names, blobs, strict=True):
            self.put(name, blob)

    def get_all(self, names: list[str]) -> list[Any]:
        out: list[Any] = []
        for lo in range(0, len(names), BATCH):
            out.extend(self.get_batch(names[lo : lo + BATCH]))
        return out


def _key(name: str) -> ChunkKey:
    return ChunkKey.parse(name)


def raw_redis(port: int) -> RawClient:
    import redis

    from kvtier.storage.remote.redis import PACKER

    # the same packer as the tier (redis-py's hiredis packer copies big values slowly): the fastest
    # redis-py there is, so the ratio is against the best raw client
    return _raw_redis(redis.Redis(connection_pool=redis.ConnectionPool(port=port, socket_timeout=30,
                                                                       command_packer=PACKER)))  # fmt: skip


def raw_redis_cluster(ports: list[int]) -> RawClient:
    from redis.cluster import ClusterNode, RedisCluster

    from kvtier.storage.remote.redis_cluster import PackedConnection

    seeds = [ClusterNode("127.0.0.1", port) for port in ports[1:]]
    r = RedisCluster(url=f"redis://127.0.0.1:{ports[0]}", startup_nodes=seeds, socket_timeout=30,
                     connection_class=PackedConnection)  # fmt: skip
    raw = _raw_redis(r)
    raw.ping = lambda: r.ping(target_nodes=RedisCluster.RANDOM)  # one node, as PING elsewhere
    return raw


def raw_redis_sentinel(port: int, service: str) -> RawClient:
    from redis.sentinel import Sentinel

    from kvtier.storage.remote.redis import PACKER

    return _raw_redis(Sentinel([("127.0.0.1", port)]).master_for(service, socket_timeout=30, command_packer=PACKER))


def _raw_redis(r: Any) -> RawClient:
    def pipelined(op: str, names: list[str]) -> list[Any]:
        pipe = r.pipeline(transaction=False)
        for name in names:
            getattr(pipe, op)(name)
        return pipe.execute()

    return RawClient(r.set, lambda names: pipelined("get", names), lambda names: pipelined("exists", names), r.ping)


def raw_s3(port: int, prefix: str) -> RawClient:
    import boto3

    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    pool = ThreadPoolExecutor(8)
    key = lambda name: f"{prefix}/{name}"  # noqa: E731

    def head(name: str) -> bool:
        s3.head_object(Bucket=BUCKET, Key=key(name))
        return True

    return RawClient(
        lambda name, blob: s3.put_object(Bucket=BUCKET, Key=key(name), Body=blob),
        lambda names: list(pool.map(lambda n: s3.get_object(Bucket=BUCKET, Key=key(n))["Body"].read(), names)),
        lambda names: list(pool.map(head, names)),
        lambda: s3.head_bucket(Bucket=BUCKET),
    )


def raw_fs(root: str) -> RawClient:
    def path(name: str) -> str:
        return os.path.join(root, name.replace("/", "_"))

    def put(name: str, blob: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path(name))  # a new file each time, as the tier writes (temp file + rename)
        with open(path(name), "wb") as f:
            f.write(blob)

    def read(name: str) -> np.ndarray:
        # into an uninitialised buffer, as the fs tier reads (f.read() was 1.5-2.6x slower here)
        with open(path(name), "rb", buffering=0) as f:
            buf = np.empty(os.fstat(f.fileno()).st_size, dtype=np.uint8)
            f.readinto(buf.data)
        return buf

    return RawClient(put, lambda names: [read(n) for n in names],
                     lambda names: [os.path.exists(path(n)) for n in names], lambda: os.stat(root))  # fmt: skip


def raw_kvtier(url: str) -> RawClient:
    """kvtier's own client without the tier (no framing, no checksum pass, no breaker)."""
    store = open_store(url, tls=TLS.get(url))
    return RawClient(
        lambda name, blob: store.put(_key(name), [blob], 30.0),
        lambda names: store.get([_key(n) for n in names], 30.0),
        lambda names: store.exists([_key(n) for n in names], 30.0),
        lambda: store.health(30.0),  # type: ignore[attr-defined]
    )


def measure(name: str, url: str, raw: RawClient, chunks: list[torch.Tensor], repeat: int) -> dict[str, float]:
    options = RemoteOptions(lookup_timeout=30.0, timeout=60.0)
    tier = RemoteTier(open_store(url, tls=TLS.get(url)), LAYOUT, RawCodec(), options)
    ns = os.urandom(16)
    keys = [ChunkKey(ns, i.to_bytes(16, "little")) for i in range(len(chunks))]
    names = [object_name(k) for k in keys]  # the raw client moves the very same objects
    blobs = [b"".join(encode_object(k, LAYOUT, RawCodec(), c)) for k, c in zip(keys, chunks, strict=True)]
    total = sum(len(b) for b in blobs)
    clear = lambda: [tier.store.delete(k, 60.0) for k in keys]  # noqa: E731 - puts of new objects, as in use
    put_raw, put_tier = paired(lambda: raw.put_all(names, blobs), lambda: [tier.put(k, c) for k, c in zip(keys, chunks, strict=True)], repeat, setup=clear)  # fmt: skip  # noqa: E501
    get_raw, get_tier = paired(lambda: raw.get_all(names), lambda: tier.get_many(keys), repeat)
    got = tier.get_many(keys)
    assert all(g is not None and torch.equal(g, c) for g, c in zip(got, chunks, strict=True)), f"{name}: bad KV"
    assert tier.stats.errors == 0, tier.stats
    look_raw, look_tier = paired(lambda: raw.exists(names), lambda: tier.prefix_len(keys), repeat * 4)
    ping = median(timeit(raw.ping, repeat * 4))
    assert tier.prefix_len(keys) == len(keys)
    tier.close()
    gb = total / 1e9
    return {
        "put_gbps": gb / put_tier, "put_raw_gbps": gb / put_raw, "put_ratio": put_raw / put_tier,
        "get_gbps": gb / get_tier, "get_raw_gbps": gb / get_raw, "get_ratio": get_raw / get_tier,
        "lookup32_ms": look_tier * 1e3, "lookup32_raw_ms": look_raw * 1e3, "ping_ms": ping * 1e3,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=32, help="chunks per measurement (default 32 = 189 MB)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--only", default="redis,redis+cluster,redis+sentinel,s3,fs,kvtier,kvtiers",
                        help="comma-separated remotes to measure")  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    chunks = [torch.randn(LAYOUT.shape(CHUNK)).to(LAYOUT.dtype) for _ in range(args.chunks)]
    results: dict[str, dict[str, float]] = {}
    started: list[Server] = []
    root = tempfile.mkdtemp(prefix="kvtier-bench-remote-")
    try:
        for kind in args.only.split(","):
            url, raw = _remote(kind, root, started)
            results[kind] = measure(kind, url, raw, chunks, args.repeat)
            print(f"{kind}: done", flush=True)
    finally:
        for server in started:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    _report(results, chunks[0].nbytes)


def _remote(kind: str, root: str, started: list[Server]) -> tuple[str, RawClient]:
    if kind == "fs":
        os.makedirs(os.path.join(root, "raw"))
        return f"fs://{root}/tier", raw_fs(os.path.join(root, "raw"))
    if kind == "redis+cluster":
        cluster = RedisClusterGroup().start()
        started.append(cluster)
        return cluster.url, raw_redis_cluster([node.port for node in cluster.nodes])
    if kind == "redis+sentinel":
        group = RedisSentinelGroup().start()
        started.append(group)
        return group.url, raw_redis_sentinel(group.sentinel.port, SERVICE)
    if kind == "kvtiers":
        return _tls_server(root, started)
    server = {"redis": redis_server, "s3": s3_server, "kvtier": kvtier_server}[kind]().start()
    started.append(server)
    if kind == "redis":
        return f"redis://127.0.0.1:{server.port}", raw_redis(server.port)
    if kind == "s3":
        return s3_url(server, "bench"), raw_s3(server.port, "bench")
    url = f"kvtier://127.0.0.1:{server.port}"
    return url, raw_kvtier(url)


def _tls_server(root: str, started: list[Server]) -> tuple[str, RawClient]:
    """`kvtier server --tls-cert` with a certificate for 127.0.0.1 made here, and its kvtiers:// URL."""
    from pathlib import Path

    from tests.certs import make_certs

    certs = make_certs(Path(root) / "certs")
    tls = ClientTLS(ca=certs.ca)

    def ready(port: int) -> bool:
        store = open_store(f"kvtiers://127.0.0.1:{port}", tls=tls)
        try:
            return bool(store.health(1.0))  # type: ignore[attr-defined]
        except Exception:  # not up yet: any failure means "try again"
            return False
        finally:
            store.close()

    argv = lambda port: [sys.executable, "-m", "kvtier.cli", "server", "--port", str(port),  # noqa: E731
                         "--tls-cert", certs.cert, "--tls-key", certs.key]  # fmt: skip
    server = ServerProcess(argv, ready, "kvtier server (TLS)").start()
    started.append(server)
    url = f"kvtiers://127.0.0.1:{server.port}"
    TLS[url] = tls
    return url, raw_kvtier(url)


def _report(results: dict[str, dict[str, float]], chunk_bytes: int) -> None:
    rows = []
    for kind, r in results.items():
        rows.append([kind, f"{r['put_gbps']:.2f}", f"{r['put_ratio']:.2f}x", f"{r['get_gbps']:.2f}",
                     f"{r['get_ratio']:.2f}x", f"{r['lookup32_ms']:.2f}", f"{r['lookup32_raw_ms']:.2f}",
                     f"{r['ping_ms']:.2f}"])  # fmt: skip
    summary: dict[str, Any] = {"chunk_mb": round(chunk_bytes / 1e6, 2)}
    for kind, r in results.items():
        summary[kind] = {k: round(v, 3) for k, v in r.items()}
    if "kvtier" in results and "redis" in results:
        summary["kvtier_server_get_vs_redis"] = round(
            results["kvtier"]["get_gbps"] / results["redis"]["get_raw_gbps"], 3
        )
    headers = ["remote", "put GB/s", "vs raw", "get GB/s", "vs raw", "lookup 32 (ms)", "raw (ms)", "1 round trip (ms)"]
    report("remote", headers, rows, summary)


if __name__ == "__main__":
    main()
