"""Shared secrets of kvtier's services (server, P2P port, controller, admin API) and the bind rule.

A token comes from a token file or the environment. `check_bind` enforces the rule every service
follows: a service that listens beyond loopback needs a token (a start-up error naming the option
otherwise); on loopback one is recommended (a warning), since every local user can reach it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path

from kvtier.errors import ConfigError

log = logging.getLogger("kvtier.auth")


def read_token(env_var: str, token_file: str | None) -> str:
    """The token in `token_file` if given (ValueError if it is empty), else `$env_var` ("" if unset)."""
    if not token_file:
        return os.environ.get(env_var, "")
    token = Path(token_file).expanduser().read_text().strip()
    if not token:
        raise ValueError(f"--token-file {token_file} is empty")
    return token


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) reaches only this machine; "" and 0.0.0.0 do not."""
    host = host.strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def check_bind(service: str, host: str, token: str, option: str) -> None:
    """Refuse to listen beyond loopback without a token; warn about no token on loopback.

    `service` names what listens ("kvtier server"), `option` how to give it a token.
    """
    if token:
        return
    if not is_loopback(host):
        raise ConfigError(
            f"{service}: binding {host!r}, which other machines can reach, needs a token; set {option} "
            "(or bind 127.0.0.1)"
        )
    log.warning("%s on %s has no token: any local user can read and write it (set %s)", service, host, option)
