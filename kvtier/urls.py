"""The remote tier's URL grammar: schemes, their backends (by name), parsing and its errors.

    redis://[:password@]host:port/db   rediss:// (TLS)   valkey:// and valkeys:// (same protocol)
    redis+cluster://host:port[,host:port...]   redis+sentinel://host:port[,host:port...]/service[/db]
    (and rediss+, valkey+, valkeys+ of each)
    s3://bucket/prefix?endpoint=http://host:port&region=us-east-1
    fs:///shared/path                  kvtier://[:token@]host:port   kvtiers:// (TLS)

It sits below both the configuration (which checks `remote.url` when it is set) and the storage
layer (which opens the backend a parsed URL names), so neither imports the other for it.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from kvtier.errors import ConfigError, closest

_REDIS = ("redis", "rediss", "valkey", "valkeys")  # Valkey speaks Redis's protocol; rediss, valkeys: TLS
# URL scheme -> "module:factory" of its ObjectStore (imported by name on first use, so each backend's
# client library stays optional); docs/ARCHITECTURE.md lists these imports by name
BACKENDS: dict[str, str] = {
    **{scheme: "kvtier.storage.remote.redis:open_store" for scheme in _REDIS},
    **{f"{scheme}+cluster": "kvtier.storage.remote.redis_cluster:open_store" for scheme in _REDIS},
    **{f"{scheme}+sentinel": "kvtier.storage.remote.redis_sentinel:open_store" for scheme in _REDIS},
    "s3": "kvtier.storage.remote.s3:open_store",
    "fs": "kvtier.storage.remote.fs:open_store",
    "kvtier": "kvtier.server.client:open_store",
    "kvtiers": "kvtier.server.client:open_store",  # TLS
}
# schemes of LMCache's remote_url that kvtier does not speak, with what to use instead
FOREIGN = {
    "lm": "LMCache's lm:// server protocol is not supported; run `kvtier server` and use kvtier://host:port",
    "redis-sentinel": "write LMCache's redis-sentinel://h1:p1,h2:p2 as redis+sentinel://h1:p1,h2:p2/<master name>",
}


def parse_url(url: str) -> SplitResult:
    """Split and check a remote URL; ConfigError names what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in FOREIGN:
        raise ConfigError(f"remote.url: {url!r}: {FOREIGN[scheme]}")
    if scheme not in BACKENDS:
        raise ConfigError(
            f"remote.url: unknown scheme {parts.scheme or '(none)'!r} in {url!r}; "
            f"use one of {', '.join(s + '://' for s in BACKENDS)}{closest(scheme, BACKENDS)}"
        )
    if scheme == "fs":
        if parts.netloc or not parts.path.startswith("/"):
            raise ConfigError(f"remote.url: {url!r}: expected fs:///absolute/path (three slashes)")
    elif not parts.netloc:
        raise ConfigError(f"remote.url: {url!r} names no host (or bucket for s3://)")
    return parts


def backend_of(parts: SplitResult) -> tuple[str, str]:
    """The (module, factory) that open a parsed URL's store."""
    module, _, name = BACKENDS[parts.scheme.lower()].partition(":")
    return module, name
