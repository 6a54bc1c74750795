"""Building the tier chain a Config asks for."""

from __future__ import annotations

import logging

from kvtier.codec import canonical, get_codec
from kvtier.config import Config
from kvtier.errors import ConfigError
from kvtier.layout import KVLayout
from kvtier.storage.base import Tier
from kvtier.storage.chain import TierChain
from kvtier.storage.cpu import CPUTier
from kvtier.storage.disk import DiskTier
from kvtier.units import format_size

log = logging.getLogger("kvtier.engine")


def build_chain(config: Config, layout: KVLayout) -> TierChain:
    """The tiers the config asks for: L1 if its size is positive, L2 if a disk path is set, L3 if a
    remote URL is. L1 holds decoded tensors; disk and remote each encode with their own codec."""
    chunk_bytes = layout.bytes_per_token * config.chunk_size
    l1 = None
    if config.l1.size:
        _check_budget("l1.size", config.l1.size, chunk_bytes)
        l1 = CPUTier(config.l1.size, config.l1.policy)
    lower: list[Tier] = []
    if config.disk.path:
        _check_budget("disk.size", config.disk.size, chunk_bytes)
        codec = get_codec(config.codec)
        lower.append(DiskTier(config.disk.path, config.disk.size, layout, codec, config.disk.policy, config.disk.fsync))
    if config.remote.url:
        from kvtier.storage.remote import open_remote

        codec = get_codec(config.remote.codec)
        remote = open_remote(
            config.remote, layout, codec, engine_codec=canonical(config.codec), tls=config.tls.client()
        )
        lower.append(remote)
        log.info("remote tier: %s (codec %s)", remote.store.where, codec.spec)
    return TierChain(l1, lower, config.write_queue)


def _check_budget(key: str, budget: int, chunk_bytes: int) -> None:
    if budget < chunk_bytes:
        raise ConfigError(
            f"{key}: {format_size(budget)} cannot hold one chunk ({format_size(chunk_bytes)} for this "
            "model's layout and chunk size); raise it or lower chunk_size"
        )
