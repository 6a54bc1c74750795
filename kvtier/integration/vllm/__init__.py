"""The vLLM integration: `KVTierConnector`, loaded by vLLM through kv_connector_module_path.

The connector imports vLLM; it is loaded on first access, so the vLLM-free parts of this package
(plan.py, worker.py) import without vLLM installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVTierConnector", "KVTierMetadata"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kvtier.integration.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
