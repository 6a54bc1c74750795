"""P2P transfer: chunks fetched from a peer instance's L1 against a raw socket send of the same bytes.

A second process plays the peer: a CacheEngine whose L1 holds `--chunks` chunks of the built-in
model's KV shape (5.9 MB each, bf16), served to peers over the kvtier server protocol
(`kvtier.cluster.peer.serve_peers`, as `cluster.advertise` does). It also runs a raw TCP server
that, asked for n objects, sends the same framed objects (header + payload) back to back with
`sendall`. Here, the peer fetch is the peer tier's own path (RemoteTier over the kvtier client:
batches of 8, every object validated and decoded), the raw reference receives the same bytes into
fresh buffers; the two are timed alternately in the same run. Target: P2P >= 0.8x raw.

    python -m benchmarks.p2p [--chunks 32] [--repeat 5]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from benchmarks._common import paired, report
from kvtier import CacheEngine, Config, KVLayout
from kvtier.codec.framing import encode_object
from kvtier.codec.raw import RawCodec
from kvtier.keys import ChunkKey
from kvtier.server.client import KVTierClient
from kvtier.storage.remote.tier import RemoteTier

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)
CHUNK = 256
NS = bytes(16)


def keys(n: int) -> list[ChunkKey]:
    return [ChunkKey(NS, i.to_bytes(16, "little")) for i in range(n)]


def chunks(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(LAYOUT.shape(CHUNK), generator=gen).to(LAYOUT.dtype) for _ in range(n)]


def serve(n: int) -> None:
    """The peer process: L1 with n chunks behind the kvtier protocol, and a raw sender; prints both ports."""
    from kvtier.cluster.peer import serve_peers

    engine = CacheEngine(Config.from_dict({"l1": {"size": "4GiB"}}), LAYOUT)
    assert engine.chain.l1 is not None
    objects = []
    for key, kv in zip(keys(n), chunks(n), strict=True):
        engine.chain.l1.put(key, kv)
        header, payload = encode_object(key, LAYOUT, RawCodec(), kv)
        objects.append(header + bytes(payload))
    server = serve_peers(engine, "127.0.0.1", 0)
    raw = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_raw_sender, args=(raw, objects), daemon=True).start()
    print(server.address[1], raw.getsockname()[1], flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin


def _raw_sender(listener: socket.socket, objects: list[bytes]) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        request = conn.recv(4)
        if len(request) < 4:
            return
        for obj in objects[: int.from_bytes(request, "little")]:
            conn.sendall(obj)


def raw_fetch(sock: socket.socket, sizes: list[int]) -> list[memoryview]:
    """Ask the raw sender for len(sizes) objects; receive each into a fresh buffer (allocated as
    the kvtier client does: not zero-filled)."""
    sock.sendall(len(sizes).to_bytes(4, "little"))
    out = []
    for size in sizes:
        view, got = np.empty(size, dtype=np.uint8).data, 0
        while got < size:  # MSG_WAITALL: one call per object unless a signal interrupts it
            got += sock.recv_into(view[got:], size - got, socket.MSG_WAITALL)
        out.append(view)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=32, help="chunks per transfer (default 32 = 189 MB)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    peer = subprocess.Popen([sys.executable, "-m", "benchmarks.p2p", "--serve", str(args.chunks)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert peer.stdout is not None
        kv_port, raw_port = map(int, peer.stdout.readline().split())
        tier = RemoteTier(KVTierClient("127.0.0.1", kv_port), LAYOUT, RawCodec(), name="peer")
        sock = socket.create_connection(("127.0.0.1", raw_port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wanted = keys(args.chunks)
        expected = chunks(args.chunks)
        got = tier.get_many(wanted)
        assert all(g is not None and torch.equal(g, e) for g, e in zip(got, expected, strict=True)), "P2P: wrong KV"
        sizes = [128 + kv.nbytes for kv in expected]

        def p2p() -> None:
            assert all(g is not None for g in tier.get_many(wanted)), "P2P: a fetch failed"

        raw_s, p2p_s = paired(lambda: raw_fetch(sock, sizes), p2p, args.repeat)
        tier.close()
        sock.close()
    finally:
        if peer.stdin:
            peer.stdin.close()
        peer.wait(10)
    gb = sum(sizes) / 1e9
    rows = [["raw socket (same bytes)", f"{gb / raw_s:.2f}", "1.00x"], ["P2P fetch (peer tier)", f"{gb / p2p_s:.2f}",
            f"{raw_s / p2p_s:.2f}x"]]  # fmt: skip
    report("p2p", ["transfer", "GB/s", "vs raw"], rows, {
        "chunks": args.chunks, "chunk_mb": round(sizes[0] / 1e6, 2), "p2p_gbps": round(gb / p2p_s, 3),
        "raw_gbps": round(gb / raw_s, 3), "ratio": round(raw_s / p2p_s, 3), "time": time.strftime("%Y-%m-%d"),
    })  # fmt: skip


if __name__ == "__main__":
    main()
