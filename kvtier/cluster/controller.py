"""`kvtier controller`: serve the cluster controller's HTTP API in the foreground (uvicorn)."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging

from kvtier.auth import read_token
from kvtier.cluster.app import TOKEN_ENV, ControllerConfig, create_app
from kvtier.logutil import setup_logging
from kvtier.units import parse_size

log = logging.getLogger("kvtier.cluster.controller")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `kvtier controller` options."""
    d = ControllerConfig()
    parser.add_argument("--host", default=d.host, help=f"interface to bind (default: {d.host}, loopback only)")
    parser.add_argument("--port", type=int, default=d.port, help=f"HTTP port (default: {d.port})")
    parser.add_argument("--missed-beats", type=int, default=d.missed_beats,
                        help=f"heartbeats missed before an instance is dead (default: {d.missed_beats})")  # fmt: skip
    parser.add_argument("--token-file", help=f"file holding the bearer token clients must send (default: ${TOKEN_ENV})")
    parser.add_argument("--max-body", default="256MiB", help="largest request body accepted (default: 256MiB)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level (default: info)")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> ControllerConfig:
    """A ControllerConfig from parsed options; ValueError (or OSError) for a bad value."""
    token = read_token(TOKEN_ENV, args.token_file)
    return ControllerConfig(
        host=args.host, port=args.port, missed_beats=args.missed_beats, max_body=parse_size(args.max_body),
        token=token,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; the exit code."""
    setup_logging(args.log_level)
    try:
        config = config_from_args(args)
    except (OSError, ValueError) as exc:
        log.error("kvtier controller: %s", exc)
        return 2
    if not config.token and not _is_loopback(config.host):
        log.warning("binding %s without a token: anyone who reaches the port can change the index", config.host)
    import uvicorn

    log.info("kvtier controller on http://%s:%d", config.host, config.port)
    app = create_app(config)
    # The index is one dict of up to millions of entries: a full GC pass would walk all of them
    # (milliseconds) at random requests. Its keys and values are bytes and ints, which the GC never
    # needs to see, so the dict object (and everything built so far) goes to the permanent generation.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
