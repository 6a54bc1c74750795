"""The kvtier server under thousands of hostile sockets: a well-behaved client's latency, the server's memory.

A `kvtier server` (64 MiB budget, a token, otherwise its defaults) runs as a subprocess, and so does
the attacker (this script with --attack), which keeps `--sockets` connections open from 127.0.0.2 and
up (250 addresses), each reconnecting `--reconnect` seconds after the server closes it:
  idle       40%  connect and say nothing
  slow       20%  trickle a HELLO, a byte a second (slowloris)
  oversized  10%  log in and announce a 1 GiB frame
  trickler   15%  log in and upload the largest frame allowed (64 MiB) at 256 KiB/s
  staller    15%  log in, send all but 1 MiB of the largest upload at full speed, then stall
(the uploads fill `--max-inflight` to the byte: a well-behaved upload must preempt one)
The well-behaved client, on 127.0.0.1, stores and then loads a 5.9 MB chunk (a real object, new key
each round) `--rounds` times on the quiet server (the reference), then again under attack.
The server's peak RSS comes from /proc (VmHWM), its counters from STATS.
Targets: p99 of put and get under attack < 50 ms; peak RSS < budget + in-flight bound + 300 MB.

    python -m benchmarks.hostile [--sockets 2000] [--rounds 200] [--plot benchmarks/plots/hostile.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np
import torch

from benchmarks._common import report
from kvtier import KVLayout
from kvtier.codec.framing import encode_object
from kvtier.codec.raw import RawCodec
from kvtier.keys import ChunkKey
from kvtier.server.client import KVTierClient
from kvtier.server.protocol import Op, pack_header
from kvtier.storage.remote.store import StoreOptions
from kvtier.units import MiB
from tests.server.conftest import proc_status

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)  # 5.9 MB per 256 tokens
TOKEN = "bench-token"
BUDGET, INFLIGHT, OVERHEAD = 64 * MiB, 256 * MiB, 300 * MiB
MIX = (("idle", 0.40), ("slow", 0.20), ("oversized", 0.10), ("trickler", 0.15), ("staller", 0.15))


def source(i: int) -> str:
    return f"127.0.{(i % 250 + 2) // 254}.{(i % 250 + 2) % 254 or 254}"


def frame(op: int, meta: dict[str, Any], body_len: int = 0) -> bytes:
    data = msgspec.msgpack.encode(meta)
    return pack_header(op, 1, len(data), body_len) + data


# --- the attacker (a subprocess) -----------------------------------------------------------------


async def hostile(kind: str, i: int, port: int, reconnect: float, counts: dict[str, int]) -> None:
    hello = frame(Op.HELLO, {"token": TOKEN, "client": "hostile"})
    put = frame(Op.PUT, {"key": os.urandom(32)}, 0)
    put = frame(Op.PUT, {"key": os.urandom(32)}, 64 * MiB - len(put))  # exactly the default max_frame
    while True:
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source(i), 0))
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)  # spare this machine's kernel memory
            counts["connects"] += 1
            if kind == "slow":
                for byte in hello:
                    writer.write(bytes([byte]))
                    await asyncio.sleep(1.0)
            elif kind != "idle":
                writer.write(hello)
                await reader.read(4096)
                if kind == "oversized":
                    writer.write(frame(Op.PUT, {"key": os.urandom(32)}, 1 << 30))
                else:
                    writer.write(put)
                    piece = bytes(256 * 1024 if kind == "trickler" else MiB)
                    for _ in range(63 * MiB // len(piece)):
                        writer.write(piece)
                        await writer.drain()
                        if kind == "trickler":
                            await asyncio.sleep(1.0)
            await reader.read(1 << 16)  # until the server closes it
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if writer is not None:
                writer.close()
        counts["closed"] += 1
        await asyncio.sleep(reconnect)


async def attack(port: int, sockets: int, reconnect: float) -> None:
    counts = {"connects": 0, "closed": 0}
    kinds = [kind for kind, share in MIX for _ in range(round(share * sockets))]
    tasks = [asyncio.create_task(hostile(kind, i, port, reconnect, counts)) for i, kind in enumerate(kinds)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps({"sockets": len(tasks)}), flush=True)
    await stop.wait()
    print(json.dumps(counts), flush=True)
    os._exit(0)  # no graceful close of 2,000 sockets


# --- the measurement -----------------------------------------------------------------------------


class Rounds(NamedTuple):
    starts: list[float]  # perf_counter at the start of each successful round
    puts: list[float]  # seconds
    gets: list[float]
    connects: list[float]  # seconds for a new client to connect, log in and get HEALTH answered
    failures: list[str]  # rounds whose put or get failed (refused, timed out, ...): what happened


def rounds(client: KVTierClient, n: int, seed: int) -> Rounds:
    """n rounds of put+get of a new 5.9 MB object on the pooled connection, then a new connection
    (what a starting engine does); a failed round is counted, not timed."""
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(LAYOUT.shape(256), generator=generator).to(LAYOUT.dtype)
    out = Rounds([], [], [], [], [])
    host, port = client._address
    for r in range(n):
        key = ChunkKey(os.urandom(16), r.to_bytes(16, "little"))
        obj = b"".join(encode_object(key, LAYOUT, RawCodec(), kv))
        t0 = time.perf_counter()
        try:
            client.put(key, [obj], 10.0)
            t1 = time.perf_counter()
            got = client.get([key], 10.0)[0]
            t2 = time.perf_counter()
            fresh = KVTierClient(host, port, TOKEN, StoreOptions(connect_timeout=5.0, max_connections=1))
            try:
                fresh.health(10.0)
            finally:
                fresh.close()
            t3 = time.perf_counter()
        except Exception as exc:  # the server refused or dropped us: what an attack must not cause
            out.failures.append(f"{type(exc).__name__}: {exc}")
            continue
        assert got is not None and bytes(got) == obj, "a well-behaved client read wrong bytes"
        out.starts.append(t0)
        out.puts.append(t1 - t0)
        out.gets.append(t2 - t1)
        out.connects.append(t3 - t2)
    return out


def start(cmd: list[str], marker: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    while marker not in (line := proc.stdout.readline()):
        if not line:
            raise RuntimeError(f"{cmd[2:5]} exited: {proc.wait()}")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=2000, help="hostile connections kept open (default 2000)")
    parser.add_argument("--rounds", type=int, default=200, help="put+get rounds per phase (default 200)")
    parser.add_argument(
        "--reconnect", type=float, default=0.5, help="seconds before a closed hostile socket reconnects"
    )
    parser.add_argument("--settle", type=float, default=10.0, help="seconds of attack before measuring")
    parser.add_argument("--plot", type=Path, help="write a PNG of latencies and server RSS over time")
    parser.add_argument("--attack", type=int, help=argparse.SUPPRESS)  # internal: be the attacker of this port
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.sockets + 1024)), hard))
    if args.attack:
        asyncio.run(attack(args.attack, args.sockets, args.reconnect))
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token_file = Path(tempfile.mkdtemp(prefix="kvtier-hostile-")) / "token"
    token_file.write_text(TOKEN)
    server = start([sys.executable, "-m", "kvtier", "server", "--port", str(port), "--memory", "64MiB",
                    "--token-file", str(token_file), "--log-level", "info"], "listening on")  # fmt: skip
    threading.Thread(target=lambda: [None for _ in server.stdout or ()], daemon=True).start()  # drain its log
    rss: list[tuple[float, int]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.2):
            rss.append((time.perf_counter(), proc_status(server.pid, "VmRSS")))

    threading.Thread(target=sample, daemon=True).start()
    attacker = None
    client = KVTierClient("127.0.0.1", port, TOKEN, StoreOptions(connect_timeout=5.0, max_connections=2))
    try:
        idle_rss = proc_status(server.pid, "VmRSS")
        rounds(client, 10, seed=1)  # warm up
        quiet = rounds(client, args.rounds, seed=2)
        attacker = start([sys.executable, "-m", "benchmarks.hostile", "--attack", str(port), "--sockets",
                          str(args.sockets), "--reconnect", str(args.reconnect)], "sockets")  # fmt: skip
        time.sleep(args.settle)
        attacked = rounds(client, args.rounds, seed=3)
        try:
            stats = client.stats()["server"]
        except Exception as exc:  # locked out
            print(f"no STATS from the server under attack: {exc}")
            stats = {}
        peak = proc_status(server.pid, "VmHWM")
    finally:
        sampling.set()
        client.close()
        if attacker is not None:
            attacker.send_signal(signal.SIGTERM)
            counts = json.loads((attacker.communicate(timeout=30)[0] or "{}").strip().splitlines()[-1])
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    _report(args, quiet, attacked, stats, counts, idle_rss, peak)
    if args.plot:
        _plot(args.plot, quiet, attacked, rss, args.settle)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1e3, q)) if values else float("nan")


def _report(args: argparse.Namespace, quiet: Rounds, attacked: Rounds, stats: dict[str, Any],
            counts: dict[str, int], idle_rss: int, peak: int) -> None:  # fmt: skip
    rows: list[list[object]] = []
    for name, r in (("quiet (reference)", quiet), (f"{args.sockets} hostile sockets", attacked)):
        rows.append([name, f"{_pct(r.puts, 50):.1f}", f"{_pct(r.puts, 99):.1f}", f"{_pct(r.gets, 50):.1f}",
                     f"{_pct(r.gets, 99):.1f}", f"{_pct(r.connects, 99):.1f}",
                     f"{len(r.failures)}/{args.rounds}"])  # fmt: skip
    bound = BUDGET + INFLIGHT + OVERHEAD
    summary = {
        "sockets": args.sockets, "rounds": args.rounds, "chunk_mb": 5.9,
        "quiet_put_p99_ms": round(_pct(quiet.puts, 99), 2), "quiet_get_p99_ms": round(_pct(quiet.gets, 99), 2),
        "attack_put_p50_ms": round(_pct(attacked.puts, 50), 2), "attack_put_p99_ms": round(_pct(attacked.puts, 99), 2),
        "attack_get_p50_ms": round(_pct(attacked.gets, 50), 2), "attack_get_p99_ms": round(_pct(attacked.gets, 99), 2),
        "attack_slowest_ms": round(_pct(attacked.puts + attacked.gets, 100), 2),
        "attack_connect_p99_ms": round(_pct(attacked.connects, 99), 2), "attack_failures": len(attacked.failures),
        "first_failure": attacked.failures[0] if attacked.failures else None,
        "idle_rss_mib": round(idle_rss / MiB), "peak_rss_mib": round(peak / MiB), "rss_bound_mib": round(bound / MiB),
        "p99_target_met": not attacked.failures and max(_pct(attacked.puts, 99), _pct(attacked.gets, 99)) < 50,
        "rss_target_met": peak < bound,
        "hostile_connects": counts.get("connects", 0),
        "server": {k: stats.get(k) for k in ("connections", "connections_total", "pending_dropped", "login_timeouts",
                                         "uploads_preempted", "uploads_refused", "timeouts", "errors")},
    }  # fmt: skip
    headers = ["phase", "put p50 (ms)", "put p99 (ms)", "get p50 (ms)", "get p99 (ms)", "new conn. p99 (ms)",
               "failed rounds"]  # fmt: skip
    summary = {k: None if isinstance(v, float) and v != v else v for k, v in summary.items()}  # NaN: no rounds
    report("hostile", headers, rows, summary)


def _plot(out: Path, quiet: Rounds, attacked: Rounds, rss: list[tuple[float, int]], settle: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = quiet.starts[0]
    fig, (lat, mem) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, r, color in (("quiet", quiet, "tab:blue"), ("under attack", attacked, "tab:red")):
        xs = [s - t0 for s in r.starts]
        lat.scatter(xs, [p * 1e3 for p in r.puts], s=6, color=color, label=f"put, {name}")
        lat.scatter(xs, [g * 1e3 for g in r.gets], s=6, color=color, marker="x", label=f"get, {name}")
    lat.axhline(50, color="gray", linestyle="--", linewidth=1, label="p99 target")
    lat.set_ylabel("latency of a 5.9 MB chunk (ms)")
    lat.legend(fontsize=8, ncol=3)
    mem.plot([t - t0 for t, _ in rss], [r / MiB for _, r in rss], color="black", label="server RSS")
    mem.axhline((BUDGET + INFLIGHT + OVERHEAD) / MiB, color="gray", linestyle="--", linewidth=1, label="RSS bound")
    if attacked.starts:
        mem.axvspan(attacked.starts[0] - t0 - settle, attacked.starts[-1] - t0, color="tab:red", alpha=0.08,
                    label="attack")  # fmt: skip
    mem.set_ylabel("MiB")
    mem.set_xlabel("seconds")
    mem.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
