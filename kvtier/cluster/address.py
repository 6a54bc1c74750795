"""Peer addresses: the `host:port` grammar instances register (cluster.advertise) and /fetch accepts.

A host is a name or an IPv4 address, or an IPv6 address in brackets (`[::1]:7600`); the port is
1-65535. Nothing is resolved here: two addresses are the same when their hosts are spelled the
same (case aside) and their ports are equal.
"""

from __future__ import annotations

import ipaddress
import re

_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}")  # host names and IPv4 addresses


def split_address(address: object, what: str = "address") -> tuple[str, int]:
    """(host without brackets, port) of `address`; ValueError saying what is wrong."""
    if not isinstance(address, str):
        raise ValueError(f"{what}: expected a 'host:port' string, got {type(address).__name__}")
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{what}: {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ValueError(f"{what}: {address!r}: {host} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{what}: {address!r}: write an IPv6 host in brackets, as [::1]:7600")
    elif not _NAME.fullmatch(host):
        raise ValueError(f"{what}: {address!r}: {host!r} is not a host name or address")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise ValueError(f"{what}: {address!r}: the port must be a number in 1-65535")
    return host.lower(), int(port)
