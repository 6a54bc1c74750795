"""TLS contexts for kvtier's servers and clients (kvtier server, P2P port, controller, admin API).

Servers take a certificate chain and its key (PEM files); clients take a CA bundle (None: the
system's trust store) and whether to verify the server's certificate and host name. Both sides
require TLS 1.2 or later. Errors name the file and the option that gave it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from kvtier.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """How a client checks the servers it connects to over TLS."""

    ca: str | None = None  # PEM bundle of the CAs to trust; None = the system's trust store
    verify: bool = True  # check the server's certificate chain and host name (False: encryption only)

    def context(self) -> ssl.SSLContext:
        """A client SSLContext; ConfigError for an unreadable CA bundle."""
        return client_context(self.ca, self.verify)


def client_context(ca: str | None = None, verify: bool = True, option: str = "tls.ca") -> ssl.SSLContext:
    """An SSLContext for connecting to a kvtier service (`option`: what gave `ca`, for errors)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{option}: cannot load CA bundle {ca!r}: {exc}") from None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def server_context(cert: str, key: str | None = None, option: str = "tls.cert") -> ssl.SSLContext:
    """An SSLContext for a server presenting `cert` (PEM chain) with `key` (PEM; None: in `cert`)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # a client must not make the server redo handshakes at will
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{option}: cannot load certificate {cert!r} (key {key or cert!r}): {exc}") from None
    return ctx
