"""`kvtier server`: run a KVServer in the foreground until SIGINT or SIGTERM, then shut down gracefully."""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import signal

from kvtier.auth import read_token
from kvtier.errors import ConfigError
from kvtier.logutil import setup_logging
from kvtier.server.client import TOKEN_ENV
from kvtier.server.config import ServerConfig
from kvtier.server.server import KVServer
from kvtier.units import format_size, parse_size

log = logging.getLogger("kvtier.server")
GRACE_SECONDS = 10.0  # how long requests in flight may take to finish after a stop signal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `kvtier server` options."""
    d = ServerConfig()
    parser.add_argument("--host", default=d.host, help=f"interface to bind (default: {d.host}, loopback only)")
    parser.add_argument("--port", type=int, default=d.port, help=f"TCP port (default: {d.port})")
    parser.add_argument("--memory", default="4GiB", help="memory budget for objects, e.g. 4GiB (default: 4GiB)")
    parser.add_argument("--disk-path", help="directory of a write-through disk tier (default: memory only)")
    parser.add_argument("--disk-size", default="64GiB", help="disk budget with --disk-path (default: 64GiB)")
    parser.add_argument("--policy", default=d.policy, choices=["lru", "lfu", "fifo", "mru"],
                        help=f"eviction policy (default: {d.policy})")  # fmt: skip
    parser.add_argument("--token-file", help=f"file holding the token clients must send (default: ${TOKEN_ENV})")
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (clients use kvtiers://)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert (default: in the cert file)")
    parser.add_argument("--max-frame", default="64MiB", help="largest request accepted (default: 64MiB)")
    parser.add_argument("--max-inflight", default="256MiB",
                        help="request bodies held in memory at once, besides --memory (default: 256MiB)")  # fmt: skip
    parser.add_argument("--max-connections", type=int, default=d.max_connections,
                        help=f"logged-in connections (default: {d.max_connections})")  # fmt: skip
    parser.add_argument("--max-pending", type=int, default=d.max_pending,
                        help=f"connections not logged in yet; the oldest is closed for a new one "
                             f"(default: {d.max_pending}, {d.max_pending_per_address} per address)")  # fmt: skip
    parser.add_argument("--login-timeout", type=float, default=d.login_timeout,
                        help=f"seconds a new connection has to log in (default: {d.login_timeout:g})")  # fmt: skip
    parser.add_argument("--min-rate", default="4MiB",
                        help="bytes/s below which a frame is cut after 1 s of grace (default: 4MiB)")  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level (default: info)")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """A ServerConfig from parsed `kvtier server` options; ValueError for a bad value."""
    token = read_token(TOKEN_ENV, args.token_file)
    return ServerConfig(
        host=args.host, port=args.port, memory=parse_size(args.memory), disk_path=args.disk_path,
        disk_size=parse_size(args.disk_size), policy=args.policy, token=token,
        max_frame=parse_size(args.max_frame), max_connections=args.max_connections,
        max_inflight_bytes=parse_size(args.max_inflight), max_pending=args.max_pending,
        login_timeout=args.login_timeout, min_rate=parse_size(args.min_rate),
        tls_cert=args.tls_cert, tls_key=args.tls_key,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; the exit code."""
    setup_logging(args.log_level)
    try:
        config = config_from_args(args)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:  # a non-loopback bind without a token, an unreadable certificate
        log.error("cannot start: %s", exc)
        return 2
    except (OSError, ValueError) as exc:  # port in use, unwritable disk path
        log.error("cannot start: %s", exc)
        return 1
    return 0


async def serve(config: ServerConfig) -> None:
    """Start the server, log where it listens, and stop it gracefully on SIGINT or SIGTERM."""
    server = KVServer(config)
    host, port = await server.start()
    # what is alive now (torch, numpy, ~170k objects) lives as long as the process: take it out of the
    # collector's full passes, which took 40-70 ms each under a connection flood (benchmarks/hostile.py)
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, functools.partial(_on_signal, sig, stop))
    disk = f"disk {config.disk_path} ({format_size(config.disk_size)})" if config.disk_path else "no disk"
    auth = "token required" if config.token else "no auth"
    tls = "TLS" if server.tls else "plain TCP"
    log.info(
        "listening on %s:%d (%s, memory %s, %s, %s, at most %s of requests in flight)",
        host, port, tls, format_size(config.memory), disk, auth, format_size(config.max_inflight_bytes),
    )  # fmt: skip
    await stop.wait()
    await server.shutdown(GRACE_SECONDS)


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    if stop.is_set():
        log.info("%s: already stopping", sig.name)
        return
    log.info("%s: finishing requests in flight, then stopping", sig.name)
    stop.set()
