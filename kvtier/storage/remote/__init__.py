"""Remote (L3) tiers selected by URL: the backend a URL names is imported only when configured.

The URL grammar (schemes, the backend of each, parsing) is `kvtier.urls`; `open_remote()` turns a
Config's remote section into a RemoteTier over the backend's ObjectStore.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kvtier.errors import ConfigError
from kvtier.tls import ClientTLS
from kvtier.urls import backend_of, parse_url

if TYPE_CHECKING:
    from kvtier.codec import Codec
    from kvtier.config import RemoteConfig
    from kvtier.layout import KVLayout
    from kvtier.storage.remote.store import ObjectStore
    from kvtier.storage.remote.tier import RemoteTier


def open_store(
    url: str,
    connect_timeout: float = 0.5,
    max_connections: int = 8,
    tls: ClientTLS | None = None,
    max_object: int = 1 << 30,
) -> ObjectStore:
    """The ObjectStore of the backend that `url`'s scheme selects (`tls`: how kvtiers:// checks its server)."""
    from kvtier.storage.remote.store import StoreFactory, StoreOptions

    parts = parse_url(url)
    module, name = backend_of(parts)
    try:
        factory: StoreFactory = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ConfigError(
            f"remote.url: the {parts.scheme}:// backend needs a package that is not installed ({exc.name}); "
            "install kvtier[remote]"
        ) from exc
    return factory(parts, StoreOptions(connect_timeout, max_connections, max_object, tls or ClientTLS()))


def open_remote(
    config: RemoteConfig, layout: KVLayout, codec: Codec, engine_codec: str, tls: ClientTLS | None = None
) -> RemoteTier:
    """The RemoteTier that `config` describes (config.url must be set; `tls` from Config.tls)."""
    from kvtier.storage.remote.tier import RemoteOptions, RemoteTier

    if not config.url:
        raise ConfigError("remote.url is not set")
    store = open_store(config.url, config.connect_timeout_ms / 1e3, config.max_connections, tls, config.max_object)
    return RemoteTier(store, layout, codec, RemoteOptions.from_config(config), engine_codec=engine_codec)
