"""Cluster controller: lookup latency with many indexed chunks, and event ingest rate, over HTTP.

A `kvtier controller` process on loopback gets `--instances` registered instances and `--chunks`
distinct chunks (documents of `--doc-chunks` chained chunks, each held by a random subset of the
instances with a random prefix length, in L1 or L2), sent as event batches of `--batch` events over
one keep-alive connection: the ingest rate is events applied per second, HTTP included. Then
`--lookups` lookups of random documents by chunk hashes, and some by tokens (the controller hashes
8,192 tokens), each timed at the client. Targets: lookup p99 < 5 ms, ingest >= 100,000 events/s.

    python -m benchmarks.controller [--chunks 1000000] [--instances 4] [--lookups 2000]
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import random
import statistics
import time
from typing import Any

import msgspec

from benchmarks._common import report
from kvtier.cluster.app import MSGPACK
from kvtier.cluster.events import encode_record
from kvtier.cluster.index import ChunkIndex
from kvtier.keys import ChunkHasher
from tests.cluster.procs import Controller

NS = bytes(range(16))
CHUNK = 256


class Client:
    """POSTs over one keep-alive connection; returns the decoded JSON answer and the seconds taken."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> tuple[Any, float]:
        start = time.perf_counter()
        self.conn.request("POST", path, body, {"Content-Type": content_type})
        response = self.conn.getresponse()
        data = response.read()
        took = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}: {data[:200]!r}")
        return json.loads(data), took


def make_docs(args: argparse.Namespace, hasher: ChunkHasher, rng: random.Random) -> list[tuple[list[int], list[bytes]]]:
    """Documents: (tokens or [], chunk keys). The first `token_docs` come from real tokens."""
    docs = []
    for d in range(args.chunks // args.doc_chunks):
        if d < args.token_docs:
            tokens = [rng.randrange(50_000) for _ in range(args.doc_chunks * CHUNK)]
            docs.append((tokens, [c.key.namespace + c.key.digest for c in hasher.chunks(tokens)]))
        else:
            docs.append(([], [NS + rng.randbytes(16) for _ in range(args.doc_chunks)]))
    return docs


def events_per_instance(args: argparse.Namespace, docs: list, rng: random.Random) -> list[list[bytes]]:
    """Each document goes to 1-3 instances: the first holds all of it, the others a random prefix, in L1 or L2."""
    out: list[list[bytes]] = [[] for _ in range(args.instances)]
    for _, keys in docs:
        holders = rng.sample(range(args.instances), rng.randint(1, min(3, args.instances)))
        for inst in holders:
            tier = rng.randrange(2)
            n = len(keys) if inst == holders[0] or rng.random() < 0.5 else rng.randint(1, len(keys))
            out[inst].extend(encode_record(tier, True, k) for k in keys[:n])
    return out


def ingest(client: Client, records: list[list[bytes]], batch: int) -> tuple[int, float]:
    """Send every instance's records as numbered batches; (events, seconds)."""
    total, seconds = 0, 0.0
    for inst, recs in enumerate(records):
        for seq, lo in enumerate(range(0, len(recs), batch), start=1):
            body = msgspec.msgpack.encode({"id": f"i{inst}", "seq": seq, "events": b"".join(recs[lo : lo + batch])})
            answer, took = client.post("/events", body, MSGPACK)
            assert answer["status"] == "ok", answer
            total += min(batch, len(recs) - lo)
            seconds += took
    return total, seconds


def percentiles(times: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000 for t in times)
    return {"p50_ms": statistics.median(ms), "p99_ms": ms[int(len(ms) * 0.99) - 1], "max_ms": ms[-1]}


def _ms(stats: dict[str, float], digits: int = 2) -> list[str]:
    return [f"{stats[k]:.{digits}f} ms" for k in ("p50_ms", "p99_ms", "max_ms")]


def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    hasher = ChunkHasher(CHUNK, NS, "xxh128")
    docs = make_docs(args, hasher, rng)
    records = events_per_instance(args, docs, rng)
    index = ChunkIndex()  # the same events applied in process, without HTTP
    start = time.perf_counter()
    for inst, recs in enumerate(records):
        index.apply(inst, b"".join(recs))
    in_process = sum(map(len, records)) / (time.perf_counter() - start)
    local = []
    for _ in range(args.lookups):
        keys = docs[rng.randrange(len(docs))][1]
        start = time.perf_counter()
        index.prefixes(keys, range(args.instances))
        local.append(time.perf_counter() - start)
    del index
    controller = Controller(missed_beats=1000)
    try:
        client = Client(controller.port)
        for inst in range(args.instances):
            reg = {"id": f"i{inst}", "model": "bench", "namespace": NS.hex(), "chunk_size": CHUNK, "hash": "xxh128",
                   "save_partial": True, "heartbeat_s": 3600.0}  # fmt: skip
            client.post("/register", json.dumps(reg).encode())
            client.post("/snapshot", msgspec.msgpack.encode({"id": f"i{inst}", "seq": 0, "tiers": {}}), MSGPACK)
        events, seconds = ingest(client, records, args.batch)
        del records
        gc.collect()
        gc.freeze()  # this client's million keys must not cost it GC pauses that would read as controller latency
        indexed = controller.get("/health")["chunks"]
        by_hash, by_tokens, floor = [], [], []
        for i in range(args.lookups):
            floor.append(client.post("/heartbeat", b'{"id": "i0"}')[1])  # the HTTP round trip alone
            tokens, keys = docs[rng.randrange(len(docs))]
            body = json.dumps({"namespace": NS.hex(), "hashes": [k[16:].hex() for k in keys]}).encode()
            by_hash.append(client.post("/lookup", body)[1])
            if i < args.token_lookups:
                tokens = docs[rng.randrange(args.token_docs)][0]
                by_tokens.append(client.post("/lookup", json.dumps({"tokens": tokens, "model": "bench"}).encode())[1])
    finally:
        controller.stop()
    h, t, p, f = percentiles(by_hash[10:]), percentiles(by_tokens[5:]), percentiles(local), percentiles(floor[10:])
    rows = [
        ["ingest (HTTP, msgpack batches)", f"{events / seconds:,.0f} events/s", f"{args.batch} per batch", ""],
        ["ingest (in process)", f"{in_process:,.0f} events/s", "", ""],
        ["index lookup (in process)", *_ms(p, 3)],
        ["heartbeat (HTTP floor)", *_ms(f)],
        [f"lookup by {args.doc_chunks} hashes", *_ms(h)],
        [f"lookup by {args.doc_chunks * CHUNK} tokens", *_ms(t)],
    ]
    print(f"{indexed:,} chunks indexed across {args.instances} instances ({events:,} events)")
    report("controller", ["what", "p50 / rate", "p99", "max"], rows, {
        "chunks_indexed": indexed, "instances": args.instances, "events": events,
        "ingest_events_per_s": round(events / seconds), "ingest_in_process_events_per_s": round(in_process),
        "lookup_hashes_ms": h, "lookup_tokens_ms": t, "index_lookup_ms": p, "heartbeat_ms": f,
    })  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=1_000_000, help="distinct chunks indexed (default: 1,000,000)")
    parser.add_argument("--instances", type=int, default=4, help="registered instances (default: 4)")
    parser.add_argument("--doc-chunks", type=int, default=32, help="chunks per document (default: 32 = 8,192 tokens)")
    parser.add_argument("--batch", type=int, default=10_000, help="events per batch (default: 10,000)")
    parser.add_argument("--lookups", type=int, default=2000, help="lookups by hashes (default: 2,000)")
    parser.add_argument("--token-lookups", type=int, default=200, help="lookups by tokens (default: 200)")
    parser.add_argument("--token-docs", type=int, default=50, help="documents made of real tokens (default: 50)")
    parser.add_argument("--seed", type=int, default=0)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
