"""Remote (L3) tiers selected by URL: a registry of backends, imported only when configured.

    redis://[:password@]host:port/db   rediss:// (TLS)   valkey:// and valkeys:// (same protocol)
    redis+cluster://host:port[,host:port...]   redis+sentinel://host:port[,host:port...]/service[/db]
    (and rediss+, valkey+, valkeys+ of each)
    s3://bucket/prefix?endpoint=http://host:port&region=us-east-1
    fs:///shared/path                  kvtier://[:token@]host:port

`open_remote()` turns a Config's remote section into a RemoteTier over the backend's ObjectStore.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

from kvtier.errors import ConfigError

if TYPE_CHECKING:
    from kvtier.codec import Codec
    from kvtier.config import RemoteConfig
    from kvtier.layout import KVLayout
    from kvtier.storage.remote.store import ObjectStore
    from kvtier.storage.remote.tier import RemoteTier

_REDIS = ("redis", "rediss", "valkey", "valkeys")  # Valkey speaks Redis's protocol; rediss, valkeys: TLS
# URL scheme -> "module:factory" (the module is imported on first use, so its client library is optional)
BACKENDS: dict[str, str] = {
    **{scheme: "kvtier.storage.remote.redis:open_store" for scheme in _REDIS},
    **{f"{scheme}+cluster": "kvtier.storage.remote.redis_cluster:open_store" for scheme in _REDIS},
    **{f"{scheme}+sentinel": "kvtier.storage.remote.redis_sentinel:open_store" for scheme in _REDIS},
    "s3": "kvtier.storage.remote.s3:open_store",
    "fs": "kvtier.storage.remote.fs:open_store",
    "kvtier": "kvtier.server.client:open_store",
}
# schemes of LMCache's remote_url that kvtier does not speak, with what to use instead
_FOREIGN = {
    "lm": "LMCache's lm:// server protocol is not supported; run `kvtier server` and use kvtier://host:port",
    "redis-sentinel": "write LMCache's redis-sentinel://h1:p1,h2:p2 as redis+sentinel://h1:p1,h2:p2/<master name>",
}


def parse_url(url: str) -> SplitResult:
    """Split and check a remote URL; ConfigError names what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in _FOREIGN:
        raise ConfigError(f"remote.url: {url!r}: {_FOREIGN[scheme]}")
    if scheme not in BACKENDS:
        from kvtier.config import closest

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


def open_store(url: str, connect_timeout: float = 0.5, max_connections: int = 8) -> ObjectStore:
    """The ObjectStore of the backend that `url`'s scheme selects."""
    from kvtier.storage.remote.store import StoreFactory, StoreOptions

    parts = parse_url(url)
    module, _, name = BACKENDS[parts.scheme.lower()].partition(":")
    try:
        factory: StoreFactory = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ConfigError(
            f"remote.url: the {parts.scheme}:// backend needs a package that is not installed ({exc.name}); "
            "install kvtier[remote]"
        ) from exc
    return factory(parts, StoreOptions(connect_timeout, max_connections))


def open_remote(config: RemoteConfig, layout: KVLayout, codec: Codec, engine_codec: str) -> RemoteTier:
    """The RemoteTier that `config` describes (config.url must be set)."""
    from kvtier.storage.remote.tier import RemoteOptions, RemoteTier

    if not config.url:
        raise ConfigError("remote.url is not set")
    store = open_store(config.url, config.connect_timeout_ms / 1e3, config.max_connections)
    return RemoteTier(store, layout, codec, RemoteOptions.from_config(config), engine_codec=engine_codec)
