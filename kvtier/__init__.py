"""kvtier: store the KV cache of LLM serving engines outside GPU memory and reuse it."""

from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError, CorruptObjectError, KVTierError, LayoutError, TierError, TokenError
from kvtier.keys import Chunk, ChunkKey
from kvtier.layout import KVLayout
from kvtier.node import Node
from kvtier.version import __version__

__all__ = [
    "CacheEngine",
    "Chunk",
    "ChunkKey",
    "Config",
    "ConfigError",
    "CorruptObjectError",
    "KVLayout",
    "KVTierError",
    "LayoutError",
    "Node",
    "TierError",
    "TokenError",
    "__version__",
]
