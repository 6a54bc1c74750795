"""`kvtier controller`: serve the cluster controller's HTTP API in the foreground (uvicorn).

Beyond loopback it needs a token (--token-file or $KVTIER_CONTROLLER_TOKEN); with --tls-cert it
serves HTTPS, and --tls-ca / --tls-no-verify say how it checks https:// admin APIs it forwards to.
"""

from __future__ import annotations

import argparse
import gc
import logging

from kvtier.auth import read_token
from kvtier.cluster.app import TOKEN_ENV, ControllerConfig, create_app
from kvtier.logutil import setup_logging
from kvtier.tls import server_context
from kvtier.units import parse_size

log = logging.getLogger("kvtier.cluster.controller")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `kvtier controller` options."""
    d = ControllerConfig()
    parser.add_argument("--host", default=d.host, help=f"interface to bind (default: {d.host}, loopback only; "
                        "any other needs a token)")  # fmt: skip
    parser.add_argument("--port", type=int, default=d.port, help=f"HTTP port (default: {d.port})")
    parser.add_argument("--missed-beats", type=int, default=d.missed_beats,
                        help=f"heartbeats missed before an instance is dead (default: {d.missed_beats})")  # fmt: skip
    parser.add_argument("--token-file", help=f"file holding the bearer token clients must send (default: ${TOKEN_ENV})")
    parser.add_argument("--max-body", default="256MiB", help="largest request body accepted (default: 256MiB)")
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS (default: plain HTTP)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert (default: in the cert file)")
    parser.add_argument("--tls-ca", help="PEM CA bundle to check https:// admin APIs with (default: the system's)")
    parser.add_argument("--tls-no-verify", action="store_true",
                        help="do not check the admin APIs' certificates (encryption only)")  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level (default: info)")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> ControllerConfig:
    """A ControllerConfig from parsed options; ValueError (or OSError) for a bad value."""
    token = read_token(TOKEN_ENV, args.token_file)
    return ControllerConfig(
        host=args.host, port=args.port, missed_beats=args.missed_beats, max_body=parse_size(args.max_body),
        token=token, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
        tls_verify=not args.tls_no_verify,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; the exit code."""
    setup_logging(args.log_level)
    try:
        config = config_from_args(args)
        if config.tls_cert:  # a clear error naming the option, before uvicorn loads the files
            server_context(config.tls_cert, config.tls_key, "--tls-cert")
        app = create_app(config)  # refuses a host beyond loopback without a token
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError
        log.error("kvtier controller: %s", exc)
        return 2
    import uvicorn

    scheme = "https" if config.tls_cert else "http"
    log.info("kvtier controller on %s://%s:%d", scheme, config.host, config.port)
    # The index is one dict of up to millions of entries: a full GC pass would walk all of them
    # (milliseconds) at random requests. Its keys and values are bytes and ints, which the GC never
    # needs to see, so the dict object (and everything built so far) goes to the permanent generation.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key)  # fmt: skip
    return 0
